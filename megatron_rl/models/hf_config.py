"""HF `config.json` -> a small typed model description, and from it a Megatron
`TransformerConfig`. Supported families: Llama (SmolLM2, Llama-2/3/3.1), Qwen2, Qwen3
(QK-norm, free head_dim), the mixture-of-experts Qwen3-MoE and Mixtral (see
`megatron_rl.models.moe`), DeepSeek-V3 (multi-latent attention, `models/deepseek_v3.py`) and the vision-language Qwen2-VL / Qwen2.5-VL (`models/vl/`). Anything we cannot reproduce exactly is an error naming the
config field.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
                           "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
                           "Qwen2VLForConditionalGeneration": "qwen2_vl",
                           "DeepseekV3ForCausalLM": "deepseek_v3"}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


@dataclass
class ModelArch:
    family: str                 # a value of SUPPORTED_ARCHITECTURES
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling_factor: float | None = None   # llama3-style rope scaling
    hf_architecture: str = "LlamaForCausalLM"
    qk_layernorm: bool = False                 # Qwen3: RMSNorm on q and k per head
    # Mixture of experts (num_experts 0 = dense). moe_layers[i] is 1 for a sparse layer i.
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = True            # renormalise the top-k probabilities
    moe_layers: list[int] | None = None
    # Vision-language (Qwen2-VL / Qwen2.5-VL): M-RoPE sections and the full HF config.json
    # (vision tower, special token ids), see megatron_rl.models.vl.
    mrope_section: list[int] | None = None
    vl_config: dict | None = None
    # DeepSeek-V3 (models/deepseek_v3.py): multi-latent attention (kv_lora_rank 0 = not MLA), sigmoid
    # routing with the aux-free expert bias, group-limited top-k, shared experts, YaRN.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    moe_score_function: str = "softmax"
    moe_expert_bias: bool = False
    moe_num_groups: int = 0
    moe_group_topk: int = 0
    moe_scaling_factor: float | None = None
    moe_shared_ffn_hidden_size: int = 0
    yarn: dict | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_vl(self) -> bool:
        return self.vl_config is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArch":
        return cls(**d)


def read_hf_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"HF config not found: {p}")
    with open(p) as f:
        return json.load(f)


def arch_from_hf_config(path_or_dict) -> ModelArch:
    cfg = read_hf_config(path_or_dict)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"config.json field 'architectures' = {archs!r} is not supported; "
                         f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    family = SUPPORTED_ARCHITECTURES[arch]
    if family in ("qwen2_5_vl", "qwen2_vl"):
        from megatron_rl.models.vl.config import vl_arch_from_hf
        return vl_arch_from_hf(cfg, arch)
    if family == "deepseek_v3":
        from megatron_rl.models.deepseek_v3 import deepseek_v3_arch_from_hf
        return deepseek_v3_arch_from_hf(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json field 'hidden_act' = {act!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias", False):
        raise ValueError("config.json field 'mlp_bias' = true is not supported")
    if family == "llama" and cfg.get("attention_bias", False):
        raise ValueError("config.json field 'attention_bias' = true is not supported for Llama")
    if family in ("qwen3", "qwen3_moe") and cfg.get("attention_bias", False):
        raise ValueError(f"config.json field 'attention_bias' = true is not supported for {arch}")
    if family in ("qwen2", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window", False):
        raise ValueError("config.json field 'use_sliding_window' = true is not supported")
    if family == "mixtral" and cfg.get("sliding_window") is not None:
        raise ValueError(f"config.json field 'sliding_window' = {cfg['sliding_window']!r} is not supported "
                         "(only null: full attention)")
    rope_scaling = cfg.get("rope_scaling")
    factor = None
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind == "default":
            pass
        elif kind == "llama3" and rope_scaling.get("low_freq_factor", 1.0) == 1.0 \
                and rope_scaling.get("high_freq_factor", 4.0) == 4.0 \
                and rope_scaling.get("original_max_position_embeddings", 8192) == 8192:
            factor = float(rope_scaling["factor"])
        else:
            raise ValueError(f"config.json field 'rope_scaling' = {rope_scaling!r} is not supported "
                             "(only none or llama3 with low/high freq factors 1/4 and original 8192)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    moe = moe_fields_from_hf(cfg, family, cfg["num_hidden_layers"]) if family in MOE_FAMILIES else {}
    return ModelArch(
        family=family,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=head_dim,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=float(rope_theta),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=(family == "qwen2"),
        rope_scaling_factor=factor,
        hf_architecture=arch,
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        **moe,
    )


def moe_fields_from_hf(cfg: dict, family: str, num_layers: int) -> dict:
    """ModelArch MoE fields of a Qwen3-MoE or Mixtral config.json."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not experts:
        raise ValueError("config.json field 'num_experts' (or 'num_local_experts') is missing or 0")
    if family == "mixtral":
        if cfg.get("router_jitter_noise", 0.0):
            raise ValueError(f"config.json field 'router_jitter_noise' = {cfg['router_jitter_noise']} "
                             "is not supported (only 0)")
        return dict(num_experts=int(experts), moe_top_k=int(cfg["num_experts_per_tok"]),
                    moe_ffn_hidden_size=int(cfg["intermediate_size"]), moe_norm_topk_prob=True,
                    moe_layers=[1] * num_layers)
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError("config.json field 'shared_expert_intermediate_size' is not supported for Qwen3-MoE")
    step = int(cfg.get("decoder_sparse_step", 1))
    if step < 1:
        raise ValueError(f"config.json field 'decoder_sparse_step' = {step} must be >= 1")
    dense = set(cfg.get("mlp_only_layers") or [])
    bad = sorted(i for i in dense if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"config.json field 'mlp_only_layers' has layer indices {bad} outside "
                         f"0..{num_layers - 1}")
    # transformers: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    layers = [int(i not in dense and (i + 1) % step == 0) for i in range(num_layers)]
    return dict(num_experts=int(experts), moe_top_k=int(cfg["num_experts_per_tok"]),
                moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
                moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=layers)


def arch_to_hf_config(arch: ModelArch, dtype: str = "float32") -> dict:
    """The inverse, for writing HF checkpoints."""
    if arch.is_vl:
        return {**arch.vl_config, "torch_dtype": dtype}
    if arch.family == "deepseek_v3":
        from megatron_rl.models.deepseek_v3 import deepseek_v3_hf_config
        return deepseek_v3_hf_config(arch, dtype)
    cfg = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.family,
        "num_hidden_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "intermediate_size": arch.ffn_hidden_size,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    if arch.rope_scaling_factor:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": arch.rope_scaling_factor,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    if arch.family in ("llama", "qwen3", "qwen3_moe"):
        cfg["attention_bias"] = False
    if arch.family == "llama":
        cfg["mlp_bias"] = False
    if arch.family == "qwen3_moe":
        sparse = arch.moe_layers or [1] * arch.num_layers
        cfg.update(num_experts=arch.num_experts, num_experts_per_tok=arch.moe_top_k,
                   moe_intermediate_size=arch.moe_ffn_hidden_size, norm_topk_prob=arch.moe_norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[i for i, s in enumerate(sparse) if not s])
    if arch.family == "mixtral":
        cfg.update(num_local_experts=arch.num_experts, num_experts_per_tok=arch.moe_top_k,
                   intermediate_size=arch.moe_ffn_hidden_size, sliding_window=None)
    return cfg


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]
