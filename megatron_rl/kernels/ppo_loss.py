"""Token-weighted PPO/GSPO actor loss on top of the fused log-prob/entropy.

The fused part is only the log-prob and entropy of the sampled tokens; every
per-token formula (clipping, KL estimators, token weights, aggregation) is
``megatron_rl.algos.actor_loss``, so the fused loss equals the algorithm library
applied to reference log-probs by construction.
"""
from __future__ import annotations

import inspect

import torch

from megatron_rl.algos import actor_loss, get_policy_loss
from megatron_rl.kernels.logprob import token_logprob_entropy


def policy_loss_kwargs(loss_mode: str, **clip_args) -> dict:
    """The clip arguments that the registered policy loss accepts (GSPO has no ``clip_c``)."""
    accepted = inspect.signature(get_policy_loss(loss_mode)).parameters
    return {k: v for k, v in clip_args.items() if k in accepted}


def token_weighted_ppo_loss(logits: torch.Tensor, labels: torch.Tensor, old_logprob: torch.Tensor | None,
                            advantages: torch.Tensor, mask: torch.Tensor, token_weights: torch.Tensor | None = None,
                            ref_logprob: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                            clip_c: float | None = 3.0, kl_kind: str = "low_var_kl", kl_coef: float = 0.0,
                            entropy_coef: float = 0.0, loss_mode: str = "ppo", agg_mode: str = "token-mean",
                            token_weights_apply_to: str = "pg", tp_group=None, temperature: float = 1.0,
                            norm_len: int | None = None, inplace_backward: bool = False, backend: str | None = None):
    """``loss = agg(pg) + kl_coef * agg(kl) - entropy_coef * agg(entropy)``; returns ``(loss, metrics)``.

    logits: ``[batch, response_len, vocab_local]`` (vocab split over ``tp_group``);
    labels, old_logprob, advantages, mask, token_weights, ref_logprob: ``[batch, response_len]``.
    ``token_weights_apply_to``: "pg" scales the pg term only, "mask" scales the loss
    mask (KL, entropy and denominators too), as ``algos.apply_token_weights`` says.
    ``old_logprob=None``: exactly on-policy, the old log-probs are this forward's, detached (ratio 1).
    Metrics are ``algos.actor_loss``'s (pg_clipfrac, ppo_kl, pg_loss, kl_loss, entropy).
    """
    logprob, entropy = token_logprob_entropy(logits, labels, tp_group=tp_group, temperature=temperature,
                                             inplace_backward=inplace_backward, backend=backend)
    kwargs = policy_loss_kwargs(loss_mode, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)
    old = logprob.detach() if old_logprob is None else old_logprob.to(logprob.dtype)   # None: on-policy
    return actor_loss(old, logprob, advantages.to(logprob.dtype), mask,
                      policy_loss=loss_mode, policy_loss_kwargs=kwargs, agg_mode=agg_mode, norm_len=norm_len,
                      token_weights=token_weights, token_weights_apply_to=token_weights_apply_to,
                      ref_logprob=None if ref_logprob is None else ref_logprob.to(logprob.dtype),
                      kl_coef=kl_coef, kl_kind=kl_kind, entropy=entropy, entropy_coef=entropy_coef)
