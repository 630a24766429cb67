"""Layer-spec registry: which Megatron-Core transformer layer implementation to use.

- "local": Megatron-Core's own modules (unfused attention); runs on CPU and GPU.
- "te": Transformer Engine's spec; the GPU default whenever TE is importable.
- "sdpa": local modules with PyTorch's fused scaled-dot-product attention
  (registered by `megatron_rl.models.sdpa_attention` when present).
- "auto": te if importable on a GPU, else sdpa on a GPU when registered, else local.
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
        raise RuntimeError("layer spec 'te' needs transformer_engine, which is not importable here")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:
        return False


def resolve_layer_spec_name(name: str) -> str:
    if name != "auto":
        if name not in LAYER_SPECS:
            _load_optional_specs()
        if name not in LAYER_SPECS:
            raise ValueError(f"unknown layer spec {name!r}; valid: {sorted(LAYER_SPECS) + ['auto']}")
        return name
    if not torch.cuda.is_available():
        return "local"
    if te_available():
        return "te"
    _load_optional_specs()
    return "sdpa" if "sdpa" in LAYER_SPECS else "local"


def get_layer_spec(name: str = "auto", qk_layernorm: bool = False, config=None, vp_stage: int | None = None):
    """The layer spec (a dense `ModuleSpec`), or for a mixture-of-experts `config`
    (`num_moe_experts` set) the block spec of this pipeline stage's layers."""
    name = resolve_layer_spec_name(name)
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
