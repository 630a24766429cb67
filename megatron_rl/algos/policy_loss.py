"""Policy-gradient losses: PPO clipped surrogate (with dual clip) and GSPO.

Both share one call shape so `POLICY_LOSSES[name]` is interchangeable:
    loss, metrics = fn(old_logprob, logprob, advantages, mask, <clip args>,
                       agg_mode=..., token_weights=..., token_weights_apply_to=...)
Token weights follow `token_weights.apply_token_weights` ("pg": scale the per-token
surrogate only; "mask": scale the loss mask). Metrics are detached 0-d tensors computed
over the valid tokens (mask > 0), unweighted: `pg_clipfrac`, `pg_clipfrac_lower`, `ppo_kl`.
"""
from __future__ import annotations

import torch

from megatron_rl.algos.aggregation import agg_loss
from megatron_rl.algos.checks import check_finite, check_same_shape
from megatron_rl.algos.masked import masked_mean
from megatron_rl.algos.registry import POLICY_LOSSES
from megatron_rl.algos.token_weights import apply_token_weights


def _prepare(old_logprob, logprob, advantages, mask, token_weights, apply_to):
    check_same_shape("logprob", logprob, old_logprob=old_logprob, advantages=advantages, mask=mask)
    check_finite(old_logprob=old_logprob, logprob=logprob, advantages=advantages)
    pg_weight, loss_mask = apply_token_weights(mask, token_weights, apply_to)
    valid = (mask > 0).to(logprob.dtype)
    return pg_weight.to(logprob.dtype), loss_mask.to(logprob.dtype), valid


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(old_logprob: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                    clip_c: float | None = 3.0, agg_mode: str = "token-mean",
                    token_weights: torch.Tensor | None = None, token_weights_apply_to: str = "pg",
                    norm_len: int | None = None):
    """PPO: max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), r = exp(logprob - old_logprob).

    `clip_high > clip_low` is DAPO's clip-higher. Dual clip (Ye et al. 2019): for A < 0
    the loss is additionally capped at -A * clip_c (`clip_c=None` disables it). The log
    ratio is clamped to [-20, 20] before exp, as in verl.
    """
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"clip_c (dual-clip bound) must be > 1, got {clip_c}")
    pg_weight, loss_mask, valid = _prepare(old_logprob, logprob, advantages, mask,
                                           token_weights, token_weights_apply_to)
    log_ratio = torch.clamp(logprob - old_logprob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    losses = clipped
    clipfrac_lower = torch.zeros((), dtype=logprob.dtype, device=logprob.device)
    if clip_c is not None:
        loss3 = -advantages * clip_c
        negative = advantages < 0
        losses = torch.where(negative, torch.minimum(loss3, clipped), clipped)
        clipfrac_lower = masked_mean(((clipped > loss3) & negative).to(valid.dtype), valid)
    loss = agg_loss(losses * pg_weight, loss_mask, agg_mode, norm_len=norm_len)
    metrics = {
        "pg_clipfrac": masked_mean((loss2 > loss1).to(valid.dtype), valid).detach(),
        "pg_clipfrac_lower": clipfrac_lower.detach(),
        "ppo_kl": masked_mean(-log_ratio, valid).detach(),
    }
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo_policy_loss(old_logprob: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_low: float = 3e-4, clip_high: float = 4e-4,
                     agg_mode: str = "seq-mean-token-mean", token_weights: torch.Tensor | None = None,
                     token_weights_apply_to: str = "pg", norm_len: int | None = None):
    """GSPO (Zheng et al. 2025), GSPO-token form.

    s_i = exp(mean_t over valid tokens of (logprob - old_logprob)) is the length-normalised
    sequence ratio; the per-token ratio s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)] equals s_i
    in value, and its gradient flows per token (with sequence-constant advantages this is
    exactly the GSPO gradient). Loss max(-A s_it, -A clip(s_it, 1-clip_low, 1+clip_high));
    the log ratio is capped at 10. Defaults are the paper's clip ranges (3e-4, 4e-4). The
    sequence length counts tokens with mask > 0, whatever the token weights.
    """
    pg_weight, loss_mask, valid = _prepare(old_logprob, logprob, advantages, mask,
                                           token_weights, token_weights_apply_to)
    log_ratio = logprob - old_logprob
    seq_log_ratio = (log_ratio * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    log_token_ratio = logprob - logprob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(log_token_ratio, max=10.0))
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(loss1, loss2)
    loss = agg_loss(losses * pg_weight, loss_mask, agg_mode, norm_len=norm_len)
    metrics = {
        "pg_clipfrac": masked_mean((loss2 > loss1).to(valid.dtype), valid).detach(),
        "pg_clipfrac_lower": torch.zeros((), dtype=logprob.dtype, device=logprob.device),
        "ppo_kl": masked_mean(-log_ratio, valid).detach(),
    }
    return loss, metrics
