"""Advantage estimators: GRPO, RLOO, REINFORCE++ and GAE (formulas as in verl/TRL).

All take `[batch, response_len]` tensors and return `(advantages, returns)` of that
shape, zero at masked positions. They run under `no_grad` (advantages are constants
to the policy loss).

Masks: a position counts as valid when `response_mask > 0` (fractional token weights
do not change the estimators). Masked positions *inside* a response (tool observations
in multi-turn rollouts) are skipped by every recursion: the running return, the GAE
accumulator and the bootstrap value carry through them unchanged, so a reward after an
observation span reaches earlier turns undiscounted by the span. Rewards and values
sitting on masked positions are ignored by the recursions, so put rewards on valid
tokens (the outcome reward on the last valid one). GRPO/RLOO sum the rewards of all
positions, as verl does.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from megatron_rl.algos.checks import check_finite, check_same_shape
from megatron_rl.algos.masked import masked_whiten
from megatron_rl.algos.registry import register_advantage_estimator


def _valid(response_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (response_mask > 0).to(like.dtype)


def _group_ids(group_index: Sequence[Hashable] | torch.Tensor, batch: int) -> torch.Tensor:
    """Map each sample's group key (any hashable) to a dense id 0..G-1, in order of first use."""
    if group_index is None:
        raise ValueError("group_index is required (one hashable group key per sample)")
    keys = group_index.tolist() if hasattr(group_index, "tolist") else list(group_index)
    if len(keys) != batch:
        raise ValueError(f"group_index has {len(keys)} entries, expected one per sample ({batch})")
    dense: dict = {}
    return torch.tensor([dense.setdefault(k, len(dense)) for k in keys], dtype=torch.long)


def _group_stats(scores: torch.Tensor, ids: torch.Tensor):
    """Per-sample (group size, group mean, unbiased group std) in float64."""
    ids = ids.to(scores.device)
    s = scores.double()
    n_groups = int(ids.max()) + 1 if ids.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, ids, torch.ones_like(s))
    total = torch.zeros_like(count).index_add_(0, ids, s)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, ids, (s - mean[ids]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    return count[ids], mean[ids], std[ids]


def _check_inputs(token_rewards, response_mask, **others):
    if token_rewards.dim() != 2:
        raise ValueError(f"'token_rewards' must be [batch, response_len], got shape {tuple(token_rewards.shape)}")
    check_same_shape("token_rewards", token_rewards, response_mask=response_mask, **others)
    check_finite(token_rewards=token_rewards, response_mask=response_mask, **others)


@register_advantage_estimator("grpo")
@torch.no_grad()
def grpo_advantage(token_rewards: torch.Tensor, response_mask: torch.Tensor,
                   group_index: Sequence[Hashable] | torch.Tensor,
                   norm_by_std: bool = True, eps: float = 1e-6):
    """GRPO outcome advantage: (R_i - mean_g) / (std_g + eps), R_i = sum of token rewards.

    std is the unbiased group std (torch.std); `norm_by_std=False` gives Dr.GRPO's
    R_i - mean_g. A group of one uses mean 0, std 1 (as verl). A zero-std group gets
    advantage 0. Advantages equal returns.
    """
    _check_inputs(token_rewards, response_mask)
    scores = token_rewards.sum(-1)
    count, mean, std = _group_stats(scores, _group_ids(group_index, scores.shape[0]))
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = scores.double() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    adv = adv.to(token_rewards.dtype).unsqueeze(-1) * _valid(response_mask, token_rewards)
    return adv, adv.clone()


@register_advantage_estimator("rloo")
@torch.no_grad()
def rloo_advantage(token_rewards: torch.Tensor, response_mask: torch.Tensor,
                   group_index: Sequence[Hashable] | torch.Tensor):
    """RLOO: R_i minus the mean of the other samples of its group, i.e. (R_i - mean_g) * n/(n-1).

    A group of one has no baseline (advantage = R_i). Advantages equal returns.
    """
    _check_inputs(token_rewards, response_mask)
    scores = token_rewards.sum(-1)
    count, mean, _ = _group_stats(scores, _group_ids(group_index, scores.shape[0]))
    s = scores.double()
    loo = (s - mean) * count / (count - 1).clamp_min(1)
    adv = torch.where(count > 1, loo, s)
    adv = adv.to(token_rewards.dtype).unsqueeze(-1) * _valid(response_mask, token_rewards)
    return adv, adv.clone()


@register_advantage_estimator("reinforce_plus_plus")
@torch.no_grad()
def reinforce_pp_advantage(token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0,
                           dp_group=None):
    """REINFORCE++: discounted return G_t = r_t + gamma * G_{t+1}, whitened over valid tokens.

    Whitening is over the whole (global, with `dp_group`) batch: masked mean, unbiased masked
    variance, 1e-8 added to the variance. Returns are the raw discounted returns.
    """
    _check_inputs(token_rewards, response_mask)
    valid = _valid(response_mask, token_rewards)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        m = valid[:, t]
        running = m * (token_rewards[:, t] + gamma * running) + (1 - m) * running
        returns[:, t] = running
    adv = masked_whiten(returns, valid, group=dp_group) * valid
    return adv, returns * valid


@register_advantage_estimator("gae")
@torch.no_grad()
def gae_advantage(token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                  gamma: float, lam: float, dp_group=None):
    """GAE(gamma, lambda): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.

    V after the last valid token is 0. Returns are A_t + V_t before whitening; advantages
    are then whitened over the valid tokens of the (global, with `dp_group`) batch (as TRL/verl).
    """
    _check_inputs(token_rewards, response_mask, values=values)
    valid = _valid(response_mask, token_rewards)
    adv = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(token_rewards[:, 0])
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(token_rewards.shape[1])):
        m = valid[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = m * (delta + gamma * lam * last_gae) + (1 - m) * last_gae
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = last_gae
    returns = (adv + values) * valid
    return masked_whiten(adv, valid, group=dp_group) * valid, returns


@torch.no_grad()
def groups_with_signal(token_rewards: torch.Tensor, group_index: Sequence[Hashable] | torch.Tensor,
                       atol: float = 0.0) -> torch.Tensor:
    """Bool `[batch]`: True where the sample's group has outcome rewards that differ.

    DAPO's dynamic sampling drops groups whose rewards are all equal (their GRPO
    advantage is 0, so they only dilute the batch); a group of one counts as no signal.
    """
    check_finite(token_rewards=token_rewards)
    scores = token_rewards.sum(-1)
    count, _, std = _group_stats(scores, _group_ids(group_index, scores.shape[0]))
    return (count > 1) & (std > atol)
