"""Masked reductions over `[batch, response_len]` tensors (the mask may be fractional).

Empty masks give 0 rather than NaN: an all-masked micro-batch must not poison the step.
"""
from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / sum(mask); 0 where the mask sums to 0."""
    num = masked_sum(x, mask, dim)
    den = mask.sum() if dim is None else mask.sum(dim)
    return num / torch.where(den != 0, den, torch.ones_like(den))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over mask > 0 (all dims); Bessel-corrected when more than one element."""
    valid = (mask > 0).to(x.dtype)
    mean = masked_mean(x, valid)
    var = masked_mean((x - mean) ** 2, valid)
    n = valid.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid tokens of the whole batch (as verl/TRL).

    Mean and unbiased variance use the valid tokens (mask > 0); the mean is added back
    when `shift_mean` is False. A batch with fewer than two valid tokens has variance 0.
    `group`: a process group whose ranks each hold part of the batch (data parallelism);
    the statistics are then those of the union (sums all-reduced), identical on every rank.
    """
    valid = (mask > 0).to(x.dtype)
    if group is None:
        mean = masked_mean(x, valid)
        var = masked_var(x, valid, unbiased=True)
    else:
        mean, var = _global_mean_var(x, valid, group)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def _global_mean_var(x: torch.Tensor, valid: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over the valid elements of every rank of `group`, in float64
    (sum, sum of squares, count all-reduced; on the GPU when NCCL needs device tensors)."""
    import torch.distributed as dist

    xd, vd = x.double(), valid.double()
    stats = torch.stack([(xd * vd).sum(), (xd * xd * vd).sum(), vd.sum()])
    if torch.cuda.is_available():
        stats = stats.cuda()
    dist.all_reduce(stats, group=group)
    total, total_sq, n = stats.cpu().unbind(0)
    mean = total / n.clamp(min=1)
    var = torch.where(n > 1, (total_sq - n * mean * mean) / (n - 1).clamp(min=1), torch.zeros_like(n))
    return mean.to(x.dtype), var.clamp(min=0).to(x.dtype)
