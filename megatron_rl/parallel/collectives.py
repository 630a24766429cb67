"""TP helpers that sit on top of Megatron's mappings."""
from __future__ import annotations

import torch


def gather_vocab_parallel(logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """All-gather vocab-parallel logits `[..., V/tp]` -> `[..., V]` (differentiable),
    dropping the padding columns past `vocab_size`."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if mpu.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits


def vocab_range(vocab_local: int) -> tuple[int, int]:
    """[start, end) of this TP rank's vocabulary slice."""
    from megatron.core import parallel_state as mpu

    r = mpu.get_tensor_model_parallel_rank()
    return r * vocab_local, (r + 1) * vocab_local
