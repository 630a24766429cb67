"""HF `config.json` -> a small typed model description, and from it a Megatron
`TransformerConfig`. Supported families: Llama (SmolLM2, Llama-2/3/3.1) and Qwen2.
Anything we cannot reproduce exactly is an error naming the config field.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


@dataclass
class ModelArch:
    family: str                 # "llama" | "qwen2"
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
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json field 'hidden_act' = {act!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias", False):
        raise ValueError("config.json field 'mlp_bias' = true is not supported")
    if family == "llama" and cfg.get("attention_bias", False):
        raise ValueError("config.json field 'attention_bias' = true is not supported for Llama")
    if family == "qwen2" and cfg.get("use_sliding_window", False):
        raise ValueError("config.json field 'use_sliding_window' = true is not supported")
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
    )


def arch_to_hf_config(arch: ModelArch, dtype: str = "float32") -> dict:
    """The inverse, for writing HF checkpoints."""
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
    if arch.family == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
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
