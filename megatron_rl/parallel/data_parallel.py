"""Data-parallel helpers: which prompts this DP rank owns, and metrics averaged over DP.

Every rank draws the same global batch (SPMD sampler); each DP rank keeps a contiguous
slice of whole prompts, so a GRPO group never straddles ranks. Megatron DDP then
averages gradients over the DP group, which makes the update the global batch's.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def dp_rank_size() -> tuple[int, int]:
    """(rank, size) in Megatron's data-parallel group; (0, 1) without distributed set-up."""
    from megatron.core import parallel_state as mpu

    if not torch.distributed.is_initialized() or not mpu.model_parallel_is_initialized():
        return 0, 1
    return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()


def shard_for_dp(items: Sequence[T], what: str = "data.train_batch_size") -> list[T]:
    """This DP rank's contiguous slice of `items`; the length must divide by the DP size."""
    rank, size = dp_rank_size()
    if size == 1:
        return list(items)
    if len(items) % size:
        raise ValueError(f"{what}={len(items)} must be a multiple of the data-parallel size {size} "
                         f"(world size / (tp * pp))")
    per = len(items) // size
    return list(items[rank * per:(rank + 1) * per])


def _reduce_op(key: str):
    if key.endswith("/max") or key.endswith("_max"):
        return torch.distributed.ReduceOp.MAX
    if key.endswith("/min") or key.endswith("_min"):
        return torch.distributed.ReduceOp.MIN
    return torch.distributed.ReduceOp.SUM


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics of the global batch: mean over DP ranks (max/min for keys ending so).

    Every rank must hold the same keys (SPMD). Timings are left per rank.
    """
    rank, size = dp_rank_size()
    if size == 1 or not metrics:
        return metrics
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group()
    keys = sorted(k for k in metrics if not k.startswith("timing/"))
    out = dict(metrics)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    by_op: dict = {}
    for k in keys:
        by_op.setdefault(_reduce_op(k), []).append(k)
    for op, ks in by_op.items():
        t = torch.tensor([float(metrics[k]) for k in ks], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=op, group=group)
        if op == torch.distributed.ReduceOp.SUM:
            t /= size
        out.update({k: v for k, v in zip(ks, t.tolist())})
    return out


def dp_mean(values: Sequence[float]) -> float:
    """Mean of `values` gathered over all DP ranks (each rank scored its own shard)."""
    rank, size = dp_rank_size()
    total = torch.tensor([float(sum(values)), float(len(values))], dtype=torch.float64,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    if size > 1:
        from megatron.core import parallel_state as mpu
        torch.distributed.all_reduce(total, group=mpu.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()
