"""The full actor objective: policy loss + kl_coef * KL(policy || ref) - entropy_coef * entropy.

One reference implementation of how token weights reach each term, shared by the trainer
and the fused kernels' tests (see `token_weights` for "pg" vs "mask"):
    pg term       agg(policy_losses * pg_weight, loss_mask)
    KL term       agg(kl_penalty(logprob, ref_logprob, kl_kind), loss_mask)
    entropy term  agg(entropy, loss_mask)
"""
from __future__ import annotations

import torch

from megatron_rl.algos.aggregation import agg_loss
from megatron_rl.algos.checks import check_finite
from megatron_rl.algos.kl import kl_penalty
from megatron_rl.algos.registry import get_policy_loss
from megatron_rl.algos.token_weights import apply_token_weights


def actor_loss(old_logprob: torch.Tensor, logprob: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, *, policy_loss: str = "ppo", policy_loss_kwargs: dict | None = None,
               agg_mode: str = "token-mean", norm_len: int | None = None,
               token_weights: torch.Tensor | None = None, token_weights_apply_to: str = "pg",
               ref_logprob: torch.Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = "low_var_kl",
               entropy: torch.Tensor | None = None, entropy_coef: float = 0.0):
    """Return (loss, metrics); metrics add `pg_loss`, `kl_loss`, `entropy` (detached) to the policy loss's."""
    pg_loss, metrics = get_policy_loss(policy_loss)(
        old_logprob, logprob, advantages, mask, agg_mode=agg_mode, norm_len=norm_len,
        token_weights=token_weights, token_weights_apply_to=token_weights_apply_to,
        **(policy_loss_kwargs or {}))
    _, loss_mask = apply_token_weights(mask, token_weights, token_weights_apply_to)
    loss_mask = loss_mask.to(logprob.dtype)
    loss = pg_loss
    metrics = dict(metrics, pg_loss=pg_loss.detach())
    if ref_logprob is not None and kl_coef != 0.0:
        kl = agg_loss(kl_penalty(logprob, ref_logprob, kl_kind), loss_mask, agg_mode, norm_len=norm_len)
        loss = loss + kl_coef * kl
        metrics["kl_loss"] = kl.detach()
    if entropy is not None:
        check_finite(entropy=entropy)
        ent = agg_loss(entropy, loss_mask, agg_mode, norm_len=norm_len)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = ent.detach()
    return loss, metrics
