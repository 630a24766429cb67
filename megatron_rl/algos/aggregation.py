"""Reduce a per-token loss matrix `[batch, response_len]` to a scalar.

Modes (the loss mask may be fractional; a sequence whose mask sums to 0 is excluded
from every sequence mean, and an all-masked batch gives 0 with a zero gradient):
  token-mean               sum(L * m) / sum(m)                      (GRPO/PPO default)
  seq-mean-token-sum       mean_i sum_t L_it m_it
  seq-mean-token-mean      mean_i [sum_t L_it m_it / sum_t m_it]    (original GRPO, GSPO)
  seq-mean-token-sum-norm  mean_i [sum_t L_it m_it / norm_len]      (Dr.GRPO)
Dr.GRPO divides each sequence's token sum by a constant instead of its length, which
removes the length bias. The constant `norm_len` defaults to `response_len`
(loss_mat.shape[-1], the padded length); pass the configured max response length so
the scale does not depend on how a batch was padded. (verl's mode of the same name sums
over sequences instead of averaging, i.e. it is `batch` times larger.)

Distributed note: these are per-micro-batch means; global token/sequence normalisation
across micro-batches and data-parallel ranks is the trainer's job.
"""
from __future__ import annotations

import torch

from megatron_rl.algos.checks import check_same_shape
from megatron_rl.algos.registry import AGG_MODES


def _seq_mean(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    has_tokens = (mask != 0).any(-1).to(per_seq.dtype)
    n = has_tokens.sum()
    return (per_seq * has_tokens).sum() / torch.where(n > 0, n, torch.ones_like(n))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / torch.where(den != 0, den, torch.ones_like(den))


@AGG_MODES.register("token-mean")
def token_mean(loss_mat, mask, norm_len=None):
    return _safe_div((loss_mat * mask).sum(), mask.sum())


@AGG_MODES.register("seq-mean-token-sum")
def seq_mean_token_sum(loss_mat, mask, norm_len=None):
    return _seq_mean((loss_mat * mask).sum(-1), mask)


@AGG_MODES.register("seq-mean-token-mean")
def seq_mean_token_mean(loss_mat, mask, norm_len=None):
    return _seq_mean(_safe_div((loss_mat * mask).sum(-1), mask.sum(-1)), mask)


@AGG_MODES.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_mat, mask, norm_len=None):
    norm = loss_mat.shape[-1] if norm_len is None else norm_len
    if norm <= 0:
        raise ValueError(f"norm_len must be > 0 for seq-mean-token-sum-norm, got {norm}")
    return _seq_mean((loss_mat * mask).sum(-1) / norm, mask)


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             norm_len: int | None = None) -> torch.Tensor:
    """Aggregate `loss_mat` over `mask` with a registered mode (see module docstring)."""
    check_same_shape("loss_mat", loss_mat, mask=mask)
    if mask.dtype in (torch.bool,) or not mask.is_floating_point():
        mask = mask.to(loss_mat.dtype)
    return AGG_MODES.lookup(mode)(loss_mat, mask, norm_len=norm_len)
