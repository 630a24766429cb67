"""Layer-spec registry: which Megatron-Core transformer layer implementation to use.

- "local": Megatron-Core's own modules (unfused attention); runs on CPU and GPU.
- "te": Transformer Engine's spec (FP8, sequence parallelism, grouped-GEMM experts).
- "sdpa": local modules with PyTorch's fused scaled-dot-product attention
  (registered by `megatron_rl.models.sdpa_attention` when present).
- "auto" (`choose_layer_spec`): local on CPU (sdpa at model.cp > 1); on a GPU te where a
  feature needs it (FP8 GEMMs, sequence parallelism: Megatron's torch norms refuse SP,
  `model.moe.grouped_gemm: true`: TEGroupedMLP experts); te for MoE models when
  transformer_engine imports (TEGroupedMLP experts: 3.23x sdpa's SequentialMLP PPO update on
  one H200, Qwen3-30B-A3B-shaped slice; bf16 logits 5.9e-3 from transformers'), sdpa where it
  does not; else sdpa: packed PPO updates on one H200 with fused RoPE in both, sdpa vs te:
  llama-1b 2.13 vs 2.23 s, SmolLM2-1.7B 2.84 vs 3.05 s, Llama-3-8B shape (8 layers) 3.55 vs 3.48 s
  (te 2% faster there, 7 GiB heavier), and te loses its fused attention on padded rows (below).
  Numbers: docs/BENCHMARKS.md ("The e2e update by kernel category").

A te forward given a padding mask runs TE's unfused attention (models/te_attention.py: TE's
fused backends ignore the mask under `causal`): O(s^2) memory, slower. Batches without padding
and packed THD micro-batches (`actor.max_tokens_per_microbatch > 0`) pass no mask and keep the
fused kernels.
"""
from __future__ import annotations

from typing import Callable

import torch

LAYER_SPECS: dict[str, Callable] = {}


def register_layer_spec(name: str):
    def deco(fn):
        LAYER_SPECS[name] = fn
        return fn
    return deco


@register_layer_spec("local")
def _local_spec(qk_layernorm: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)


@register_layer_spec("te")
def _te_spec(qk_layernorm: bool = False):
    if not te_available():
        raise RuntimeError("model.layer_spec=te needs transformer_engine, which is not importable here")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megatron_rl.models.te_attention import honour_padding_mask   # bf16 TE ignored padding masks
    return honour_padding_mask(get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm))


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:
        return False


def te_features(*, fp8: bool = False, cp: int = 1, sequence_parallel: bool = False, tp: int = 1,
                grouped_gemm: bool = False, moe: bool = False) -> list[str]:
    """The requested features that only the TE spec provides (`cp`: none; the sdpa spec has its
    own context-parallel attention, parallel/context_parallel.py)."""
    need = []
    if fp8:
        need.append("model.fp8 (FP8 GEMMs are Transformer Engine's)")
    if sequence_parallel and tp > 1:
        need.append("model.sequence_parallel (Megatron's torch norms refuse it; TE's norms support it)")
    if grouped_gemm:
        need.append("model.moe.grouped_gemm=true (grouped-GEMM experts are TE's TEGroupedMLP)")
    # `moe` is a preference, not a need (choose_layer_spec): without TE, MoE models run on sdpa.
    return need


MOE_TE_WHY = ("auto on GPU, MoE model: te with TEGroupedMLP experts (H200 Qwen3-30B-A3B-shaped slice: "
              "PPO update 3.23x sdpa's SequentialMLP; docs/BENCHMARKS.md)")


def choose_layer_spec(name: str, device: str, *, te_importable: bool | None = None,
                      **features) -> tuple[str, str]:
    """(spec, why) for `model.layer_spec` on `device` ("cpu" | "cuda"); `features` as `te_features`,
    `moe`: a MoE model whose `model.moe.grouped_gemm` is not false. Pure: the run plan calls it
    with `te_importable` None (unknown where it will run: MoE says te if TE imports there); the
    builder passes `te_available()`, and a feature that needs TE is checked when the model is built."""
    if name != "auto":
        return name, "set by model.layer_spec"
    if device != "cuda":
        if features.get("cp", 1) > 1:
            return "sdpa", "auto on cpu, model.cp > 1: sdpa (all-gather context-parallel attention; local has none)"
        return "local", "auto on cpu: Megatron's local spec"
    need = te_features(**features)
    if need:
        return "te", "auto: needed by " + ", ".join(need)
    if features.get("cp", 1) > 1:
        return "sdpa", ("auto on GPU, model.cp > 1: sdpa (its all-gather context-parallel attention covers padded "
                        "and packed micro-batches and the native engine; te's covers packed only)")
    if features.get("moe"):
        if te_importable is None:
            return "te", MOE_TE_WHY + "; sdpa where transformer_engine does not import"
        if te_importable:
            return "te", MOE_TE_WHY
        return "sdpa", "auto on GPU, MoE model, transformer_engine not importable: sdpa (SequentialMLP experts)"
    return "sdpa", ("auto on GPU, dense shape: sdpa measured faster than te at 1-2B and within 2% at 8B, with "
                    "less memory (H200 packed PPO update, llama-1b 2.13 vs 2.23 s; docs/BENCHMARKS.md)")


def config_features(config) -> dict:
    """`te_features` keywords read from a Megatron `TransformerConfig` (None: none)."""
    if config is None:
        return {}
    grouped = bool(getattr(config, "moe_grouped_gemm", False))
    return dict(fp8=bool(getattr(config, "fp8", None)), cp=getattr(config, "context_parallel_size", 1) or 1,
                sequence_parallel=bool(getattr(config, "sequence_parallel", False)),
                tp=getattr(config, "tensor_model_parallel_size", 1) or 1,
                # grouped experts were resolved with the spec (models/moe.py): a MoE config prefers
                # te exactly when it holds TEGroupedMLP experts, so the second resolution agrees
                moe=bool(getattr(config, "num_moe_experts", None)) and grouped,
                grouped_gemm=grouped)


def resolve_layer_spec_name(name: str, config=None, **features) -> str:
    """The registered spec `name` stands for here; `config` (a `TransformerConfig`) or
    `features` (`te_features` keywords) tell `auto` which TE-only features are on. Multi-latent
    attention (`config.multi_latent_attention`) runs on the local spec only: auto gives local."""
    if getattr(config, "multi_latent_attention", False):
        if name not in ("auto", "local"):
            raise ValueError(f"model.layer_spec={name!r} is not supported with multi-latent attention (DeepSeek-V3): "
                             "only the local spec's MLASelfAttention is tested here (set model.layer_spec=local or auto)")
        need = te_features(**{**config_features(config), **features}) if hasattr(config, "num_moe_experts") else []
        if need:
            raise ValueError("multi-latent attention (DeepSeek-V3) runs on the local spec only, but "
                             + ", ".join(need) + " needs Transformer Engine's")
        return "local"
    if name != "auto":
        if name not in LAYER_SPECS:
            _load_optional_specs()
        if name not in LAYER_SPECS:
            raise ValueError(f"unknown layer spec {name!r}; valid: {sorted(LAYER_SPECS) + ['auto']}")
        return name
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec, why = choose_layer_spec("auto", device, te_importable=device == "cuda" and te_available(),
                                  **{**config_features(config), **features})
    if spec == "te" and not te_available():
        raise RuntimeError(f"model.layer_spec=auto picked te ({why}), but transformer_engine is not importable here")
    if spec == "sdpa":
        _load_optional_specs()
        if "sdpa" not in LAYER_SPECS:
            return "local"
    return spec


def get_layer_spec(name: str = "auto", qk_layernorm: bool = False, config=None, vp_stage: int | None = None):
    """The layer spec (a dense `ModuleSpec`), or for a mixture-of-experts `config`
    (`num_moe_experts` set) the block spec of this pipeline stage's layers."""
    name = resolve_layer_spec_name(name, config)
    if getattr(config, "multi_latent_attention", False):     # DeepSeek-V3 (models/deepseek_v3.py)
        from megatron_rl.models.mla_attention import mla_local_spec
        spec = mla_local_spec()
    else:
        spec = LAYER_SPECS[name](qk_layernorm=qk_layernorm)
    if config is not None and config.num_moe_experts:
        from megatron_rl.models.moe import moe_block_spec
        return moe_block_spec(spec, name, config, qk_layernorm, vp_stage)
    return spec


def _load_optional_specs() -> None:
    try:
        import megatron_rl.models.sdpa_attention  # noqa: F401  (registers "sdpa")
    except ImportError:
        pass
