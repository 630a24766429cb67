"""Data-parallel helpers: which prompts this DP rank owns, and metrics reduced over DP.

Every rank draws the same global batch (SPMD sampler); each DP rank keeps a contiguous
slice of whole prompts, so a GRPO group never straddles ranks. Megatron DDP then
averages gradients over the DP group, which makes the update the global batch's.
"""
from __future__ import annotations

import math
from typing import Sequence, TypeVar

import torch

from megatron_rl.logging.values import MeanOver, StdOver, Summed

T = TypeVar("T")
NOT_A_NUMBER = "not_a_number"


def dp_rank_size() -> tuple[int, int]:
    """(rank, size) in Megatron's data-parallel group; (0, 1) without distributed set-up."""
    from megatron.core import parallel_state as mpu

    if not torch.distributed.is_initialized() or not mpu.model_parallel_is_initialized():
        return 0, 1
    return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()


def dp_group():
    """Megatron's data-parallel process group, or None when there is no data parallelism
    (what batch-wide statistics such as advantage whitening reduce over)."""
    _, size = dp_rank_size()
    if size == 1:
        return None
    from megatron.core import parallel_state as mpu
    return mpu.get_data_parallel_group()


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


def _kind(key: str, value) -> str:
    """How `value` combines over DP ranks: its type says, else the key's suffix (max/min) or a mean."""
    if isinstance(value, StdOver):
        return "std_over"
    if isinstance(value, MeanOver):
        return "mean_over"
    if isinstance(value, Summed):
        return "sum"
    if key.endswith("/max") or key.endswith("_max"):
        return "max"
    if key.endswith("/min") or key.endswith("_min"):
        return "min"
    return "mean"


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _union_schema(local: dict[str, str], group) -> dict[str, str]:
    """key -> kind over the union of every DP rank's keys; a key whose kind differs by rank is an error."""
    gathered: list = [None] * torch.distributed.get_world_size(group=group)
    torch.distributed.all_gather_object(gathered, sorted(local.items()), group=group)
    kinds: dict[str, set[str]] = {}
    for items in gathered:
        for key, kind in items:
            kinds.setdefault(key, set()).add(kind)
    bad = sorted(k for k, v in kinds.items() if NOT_A_NUMBER in v)
    if bad:                         # raised on every rank, so none waits in the all-reduce
        raise TypeError(f"metric {bad[0]!r} is not a number on some data-parallel rank; reduce_metrics "
                        f"combines numeric metrics only (non-numeric: {bad[:5]})")
    mixed = {k: sorted(v) for k, v in kinds.items() if len(v) > 1}
    if mixed:
        key = sorted(mixed)[0]
        raise ValueError(f"metric {key!r} combines as {' / '.join(mixed[key])} on different data-parallel ranks "
                         f"(e.g. a MeanOver on one rank, a plain float on another); every rank must emit a key "
                         f"the same way ({len(mixed)} such keys: {sorted(mixed)[:5]})")
    return {k: v.pop() for k, v in sorted(kinds.items())}


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics of the global batch, identical on every DP rank, over the union of the ranks' keys.

    A key some rank lacks (a data source only some ranks drew) contributes nothing there,
    not a zero. Plain floats: mean over the ranks that hold the key, max/min for keys
    ending so. `MeanOver` / `StdOver` / `Summed` (megatron_rl/logging/values.py): the
    mean / std of the pooled samples, the sum. Timings (`timing/*`) stay per rank. One
    `all_gather_object` of the key list plus at most two all-reduces per call.
    """
    _, size = dp_rank_size()
    if size == 1 or not metrics:
        return {k: float(v) if isinstance(v, (MeanOver, StdOver, Summed)) else v for k, v in metrics.items()}
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group()
    local = {k: _kind(k, v) if _is_number(v) else NOT_A_NUMBER for k, v in metrics.items()
             if not k.startswith("timing/")}
    schema = _union_schema(local, group)
    sums: list[float] = []          # per key: its slots in one SUM all-reduce
    maxes: list[float] = []         # max keys as v, min keys as -v: one MAX all-reduce
    where: dict[str, int] = {}
    for key, kind in schema.items():
        held = key in metrics
        v = float(metrics[key]) if held else 0.0
        if kind in ("max", "min"):
            where[key] = len(maxes)
            maxes.append((v if kind == "max" else -v) if held else -math.inf)
            continue
        where[key] = len(sums)
        if kind == "mean":
            sums += [v, 1.0] if held else [0.0, 0.0]
        elif kind == "mean_over":
            n = metrics[key].count if held else 0.0
            sums += [v * n, n]
        elif kind == "std_over":
            m = metrics[key]
            n, mu = (m.count, m.mean) if held else (0.0, 0.0)
            sums += [n * mu, n * (v * v + mu * mu), n]
        else:                       # sum
            sums.append(v)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reduced = {}
    for name, vals, op in (("sum", sums, torch.distributed.ReduceOp.SUM),
                           ("max", maxes, torch.distributed.ReduceOp.MAX)):
        if vals:
            t = torch.tensor(vals, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, op=op, group=group)
            reduced[name] = t.tolist()
    out = dict(metrics)
    for key, kind in schema.items():
        i = where[key]
        if kind in ("max", "min"):
            v = reduced["max"][i]
            out[key] = v if kind == "max" else -v
            continue
        s = reduced["sum"]
        if kind in ("mean", "mean_over"):
            out[key] = s[i] / s[i + 1] if s[i + 1] > 0 else math.nan
        elif kind == "std_over":
            n = s[i + 2]
            out[key] = math.sqrt(max(s[i + 1] / n - (s[i] / n) ** 2, 0.0)) if n > 0 else math.nan
        else:
            out[key] = s[i]
    return out


def dp_mean_count(values: Sequence[float]) -> tuple[float, int]:
    """(mean, count) of `values` pooled over all DP ranks (each rank scored its own shard);
    the same on every rank. The mean of no values is 0.0."""
    _, size = dp_rank_size()
    total = torch.tensor([float(sum(values)), float(len(values))], dtype=torch.float64,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    if size > 1:
        from megatron.core import parallel_state as mpu
        torch.distributed.all_reduce(total, group=mpu.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())


def dp_mean(values: Sequence[float]) -> float:
    """Mean of `values` gathered over all DP ranks (each rank scored its own shard)."""
    return dp_mean_count(values)[0]
