"""`steering.logprob_mode: rollout_is`: train the unsteered LLM on steered rollouts with a
truncated importance-sampling (TIS) correction.

The behaviour policy is the steered LLM (the engine's `rollout_logprob`); the policy being
trained is the LLM without steering. So old log-probs are recomputed *unsteered*, the update's
forward runs unsteered, and each token's policy-gradient term is weighted by

    w_t = min(exp(old_logprob_t - rollout_logprob_t), cap)       (0 on padding)

the truncated IS ratio pi_old(a_t) / pi_steered(a_t), as verl's `rollout_is` (token level,
truncate mode, `rollout_is_threshold`, default 2.0) does for its rollout/trainer mismatch. The
cap bounds the variance a strongly steered token would otherwise add; the weight carries no
gradient. `recompute` (the default) instead treats steering as part of the trained policy.
The weights are `algos.off_policy`'s truncated IS (algos/off_policy.py), not a copy of it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_rl.algos import off_policy


def truncated_is_weights(old_logprob: torch.Tensor, rollout_logprob: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """`[B, R]` weights `min(exp(old - rollout), cap) * mask` (float32, no grad): the token-level
    TIS of `algos.off_policy` (one implementation), its errors naming `steering.rollout_is_cap`."""
    return off_policy.truncated_is_weights(old_logprob, rollout_logprob, mask, cap, "token",
                                           key="steering.rollout_is_cap")


def is_metrics(weights: torch.Tensor, old_logprob: torch.Tensor, rollout_logprob: torch.Tensor,
               mask: torch.Tensor, cap: float) -> dict[str, float]:
    """Mean/max weight and the fraction of tokens truncated at the cap."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    raw = torch.exp((old_logprob.float() - rollout_logprob.float()).clamp(max=20.0))
    return {"rollout_is/weight_mean": float((weights * m).sum() / n),
            "rollout_is/weight_max": float((weights * m).max()) if m.any() else 0.0,
            "rollout_is/frac_truncated": float(((raw > cap).float() * m).sum() / n)}


class UnsteeredTraining:
    """The controller as the actor sees it under `rollout_is`: the engine steers through it
    (`set_strengths`, `set_positions`), while the actor's forwards (`use`, which `Policy`
    wraps around every log-prob and update forward) run with the hook removed, so old log-probs
    and the update are those of the unsteered LLM. Everything else delegates to `ctl`."""

    def __init__(self, ctl):
        self.ctl = ctl

    @contextmanager
    def use(self, strengths=None, is_generated=None):
        with self.ctl.disabled():
            yield self

    def __getattr__(self, name):
        return getattr(self.ctl, name)
