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


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid tokens of the whole batch (as verl/TRL).

    Mean and unbiased variance use the valid tokens (mask > 0); the mean is added back
    when `shift_mean` is False. A batch with fewer than two valid tokens has variance 0.
    """
    valid = (mask > 0).to(x.dtype)
    mean = masked_mean(x, valid)
    var = masked_var(x, valid, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean
