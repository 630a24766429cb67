"""KL penalties between the policy and the reference, and KL coefficient controllers.

Estimators (Schulman, "Approximating KL divergence", 2020; names as in verl/TRL), with
log r = ref_logprob - logprob for samples drawn from the policy:
  kl / k1      logprob - ref_logprob                     (unbiased, high variance)
  abs          |logprob - ref_logprob|
  mse / k2     0.5 (logprob - ref_logprob)^2
  low_var_kl / k3   exp(log r) - log r - 1, log r clamped to [-20, 20], result to [-10, 10]
A `+` suffix (`k3+`, `low_var_kl+`, `kl+`) keeps the named estimator's value but takes
the gradient of k2 (straight-through), whose gradient is the unbiased KL gradient.
"""
from __future__ import annotations

import torch

from megatron_rl.algos.checks import check_finite, check_same_shape
from megatron_rl.algos.masked import masked_mean
from megatron_rl.algos.registry import KL_CONTROLLERS, KL_PENALTIES


@KL_PENALTIES.register("kl", "k1")
def kl_k1(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return logprob - ref_logprob


@KL_PENALTIES.register("abs")
def kl_abs(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return (logprob - ref_logprob).abs()


@KL_PENALTIES.register("mse", "k2")
def kl_k2(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprob - ref_logprob).square()


@KL_PENALTIES.register("low_var_kl", "k3")
def kl_k3(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    log_ratio = torch.clamp(ref_logprob - logprob, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, min=-10.0, max=10.0)


def get_kl_penalty(kind: str):
    """The estimator for `kind` (a registered name, optionally with a `+` suffix)."""
    straight_through = kind.endswith("+")
    fn = KL_PENALTIES.lookup(kind[:-1] if straight_through else kind)
    if not straight_through:
        return fn

    def straight_through_fn(logprob, ref_logprob):
        value = fn(logprob, ref_logprob)
        grad_path = kl_k2(logprob, ref_logprob)
        return grad_path - grad_path.detach() + value.detach()

    return straight_through_fn


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate `[batch, response_len]` of the policy from the reference."""
    check_same_shape("logprob", logprob, ref_logprob=ref_logprob)
    check_finite(logprob=logprob, ref_logprob=ref_logprob)
    return get_kl_penalty(kind)(logprob, ref_logprob)


@torch.no_grad()
def kl_penalised_rewards(token_scores: torch.Tensor, old_logprob: torch.Tensor, ref_logprob: torch.Tensor,
                         response_mask: torch.Tensor, kl_coef: float, kind: str = "kl"):
    """KL-in-reward (PPO/RLHF style): r_t = score_t - kl_coef * KL_t on valid tokens.

    Returns (rewards, current KL) where current KL is the per-sequence token mean averaged
    over sequences (as verl), the value `KLController.update` expects.
    """
    check_finite(token_scores=token_scores)
    valid = (response_mask > 0).to(token_scores.dtype)
    kl = kl_penalty(old_logprob, ref_logprob, kind) * valid
    return token_scores - kl_coef * kl, masked_mean(kl, valid, dim=-1).mean()


class FixedKLController:
    """Constant coefficient; `update` is a no-op."""

    def __init__(self, init_kl_coef: float, **_):
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): coef *= 1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target_kl: float | None = None, horizon: float | None = None):
        if target_kl is None or target_kl <= 0:
            raise ValueError(f"adaptive kl controller needs target_kl > 0, got {target_kl}")
        if horizon is None or horizon <= 0:
            raise ValueError(f"adaptive kl controller needs horizon > 0, got {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


KL_CONTROLLERS.register("fixed")(FixedKLController)
KL_CONTROLLERS.register("adaptive")(AdaptiveKLController)


def kl_controller(kind: str = "fixed", init_kl_coef: float = 0.001, target_kl: float | None = None,
                  horizon: float | None = None):
    """A controller with `.value` (the current coefficient) and `.update(current_kl, n_steps)`."""
    cls = KL_CONTROLLERS.lookup(kind)
    return cls(init_kl_coef, target_kl=target_kl, horizon=horizon)
