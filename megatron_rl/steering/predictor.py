"""Strength predictor: prompt representation of the frozen LLM -> per-feature steering strengths.

A small MLP gives the mean of a Gaussian policy, bounded to [min_strength, max_strength] by a
tanh; samples are the strengths used for steered rollouts (not clipped: the bound is on the
mean, so log-probs stay exact for the policy gradient). Training is GRPO-style: the rewards of
the n samples drawn for one prompt form a group, advantages are group-normalised, and only the
predictor's parameters are updated.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from megatron_rl.algos import grpo_advantage
from megatron_rl.steering.hooks import capture_layer_output, run_until_captured


class StrengthPredictor(nn.Module):
    """`[N, d_model]` representations -> Normal policy over `[N, n_features]` strengths."""

    def __init__(self, d_model: int, n_features: int, hidden: int = 256, min_strength: float = -10.0,
                 max_strength: float = 10.0, init_std: float = 1.0, learn_std: bool = True):
        super().__init__()
        if not max_strength > min_strength:
            raise ValueError(f"predictor max_strength={max_strength} must exceed min_strength={min_strength}")
        if init_std <= 0:
            raise ValueError(f"predictor init_std must be > 0, got {init_std}")
        self.min_strength, self.max_strength = float(min_strength), float(max_strength)
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_features))
        nn.init.zeros_(self.net[-1].weight)          # start at the middle of the bounds, for every prompt
        nn.init.zeros_(self.net[-1].bias)
        log_std = torch.full((n_features,), math.log(init_std))
        if learn_std:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)
        self.n_features = n_features

    def mean(self, reprs: torch.Tensor) -> torch.Tensor:
        half = (self.max_strength - self.min_strength) / 2
        return self.min_strength + half * (torch.tanh(self.net(reprs.float())) + 1.0)

    def std(self) -> torch.Tensor:
        return self.log_std.exp()

    def dist(self, reprs: torch.Tensor) -> torch.distributions.Normal:
        mu = self.mean(reprs)
        return torch.distributions.Normal(mu, self.std().expand_as(mu))

    def log_prob(self, reprs: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
        """Summed over features: `[N]`. `reprs` has one row per strengths row."""
        return self.dist(reprs).log_prob(strengths.float()).sum(-1)

    def sample(self, reprs: torch.Tensor, n: int = 1, generator: torch.Generator | None = None):
        """`n` strengths per prompt: (strengths `[B*n, F]`, log-probs `[B*n]` with grad).

        Rows are grouped per prompt (prompt b owns rows b*n .. b*n+n-1), matching
        `group_index(B, n)` and rollouts that repeat each prompt n times in a row.
        """
        reprs = reprs.repeat_interleave(n, dim=0)
        mu = self.mean(reprs)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        strengths = (mu + self.std() * noise).detach()
        return strengths, self.log_prob(reprs, strengths)


def group_index(n_prompts: int, n: int) -> torch.Tensor:
    """`[B*n]` group ids for `StrengthPredictor.sample` rows."""
    return torch.arange(n_prompts).repeat_interleave(n)


def predictor_pg_loss(logprob_of_strengths: torch.Tensor, rewards: torch.Tensor, group_index,
                      norm_by_std: bool = True) -> torch.Tensor:
    """REINFORCE with GRPO advantages: -mean(A_i * log pi(s_i | prompt)), A from `grpo_advantage`."""
    rewards = rewards.detach().float().reshape(-1, 1)
    if rewards.shape[0] != logprob_of_strengths.shape[0]:
        raise ValueError(f"rewards have {rewards.shape[0]} rows but log-probs {logprob_of_strengths.shape[0]}")
    adv, _ = grpo_advantage(rewards, torch.ones_like(rewards), group_index, norm_by_std=norm_by_std)
    return -(adv[:, 0].detach() * logprob_of_strengths).mean()


@torch.no_grad()
def prompt_repr(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int,
                mode: str = "mean", forward_fn=None, steering=None) -> torch.Tensor | None:
    """Prompt representation `[B, H]` (float32) from 0-indexed layer `layer`'s output.

    mean: average over real tokens (attention_mask); last: the last real token (left or right
    padding). The forward stops right after the layer and runs with steering off. Returns None on
    a pipeline stage that does not own the layer.
    """
    if mode not in POOLING:
        raise ValueError(f"predictor.repr={mode!r}; expected one of {sorted(POOLING)}")
    if forward_fn is None:
        from megatron_rl.models.forward import gpt_forward as forward_fn
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    off = steering.disabled() if steering is not None else nullcontext()
    with off, capture_layer_output(model, layer, stop=True) as cap:
        run_until_captured(forward_fn, model, input_ids, attention_mask)
    if cap["hidden"] is None:
        return None
    hidden = cap["hidden"].transpose(0, 1).float()          # [B, S, H]
    return POOLING[mode](hidden, attention_mask.to(hidden.device).float())


def _mean_pool(hidden, mask):
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


def _last_pool(hidden, mask):
    s = mask.shape[1]
    last = s - 1 - mask.flip(-1).argmax(-1)                 # index of the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLING = {"mean": _mean_pool, "last": _last_pool}

