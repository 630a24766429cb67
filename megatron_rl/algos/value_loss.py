"""Critic loss (PPO clipped value loss) and the entropy of a categorical policy."""
from __future__ import annotations

import torch

from megatron_rl.algos.aggregation import agg_loss
from megatron_rl.algos.checks import check_finite, check_same_shape
from megatron_rl.algos.masked import masked_mean


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None, agg_mode: str = "token-mean", norm_len: int | None = None):
    """0.5 * agg(max((V - R)^2, (V_clip - R)^2)), V_clip = old_V + clamp(V - old_V, -c, c).

    Returns (loss, clipfrac); clipfrac is the detached fraction of valid tokens where the
    clipped term is larger. `clip_range=None` disables clipping.
    """
    check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    check_finite(values=values, old_values=old_values, returns=returns)
    loss1 = (values - returns) ** 2
    if clip_range is None:
        loss2 = loss1
    else:
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        loss2 = (clipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(loss1, loss2), mask, agg_mode, norm_len=norm_len)
    valid = (mask > 0).to(values.dtype)
    return loss, masked_mean((loss2 > loss1).to(values.dtype), valid).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy `[...]` of softmax(logits) over the last dim: logsumexp(z) - sum softmax(z) z.

    Stable for large logits; -inf logits (masked vocabulary entries) contribute 0.
    """
    # Shift by the max first (entropy is shift-invariant) so lse(z) - E[z] does not cancel.
    z = logits - logits.detach().amax(dim=-1, keepdim=True)
    probs = torch.softmax(z, dim=-1)
    finite_z = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    return torch.logsumexp(z, dim=-1) - (probs * finite_z).sum(-1)
