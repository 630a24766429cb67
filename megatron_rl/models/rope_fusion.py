"""When Megatron-Core's `apply_rope_fusion` (Transformer Engine's fused RoPE kernel) is used.

Unfused, Megatron applies RoPE as broadcast multiplies, a negation and two `torch.cat`s per q and
k, forward and backward: on the H200 that was ~10% of the e2e GRPO update's CUDA time
(`tools/profile_update.py`, docs/BENCHMARKS.md: a non-vectorized broadcast mul 175 ms and
`CatArrayBatchedCopy` 130 ms of a 3.4 s update). Megatron routes to TE's kernel, for any layer
spec, when the config flag is on and TE imports; this module decides the flag:

- on for CUDA builds where `megatron.core`'s rope_utils found TE's fused functions;
- off on CPU, without TE, for multi-latent attention (its fused path needs YaRN), for M-RoPE
  (vision-language: TE's kernel takes no per-row sections) and under context parallelism
  (the sdpa spec's all-gather CP applies RoPE on its own layout: parallel/context_parallel.py).
"""
from __future__ import annotations

import torch


def te_fused_rope_importable() -> bool:
    """Megatron-Core found TE's fused RoPE (bshd and THD) at import."""
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except ImportError:
        return False
    return (getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None
            and getattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None) is not None)


def use_rope_fusion(*, is_mla: bool, mrope: bool, cp: int, cuda: bool | None = None,
                    importable: bool | None = None) -> bool:
    """The value for `TransformerConfig.apply_rope_fusion` (module docstring says why)."""
    if is_mla or mrope or cp > 1:
        return False
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return False
    return te_fused_rope_importable() if importable is None else importable
