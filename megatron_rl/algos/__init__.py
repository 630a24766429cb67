"""RL algorithm library: advantages, KL penalties/controllers, policy and value losses,
loss aggregation and token weights. Pure torch; no trainer or Megatron imports.

Everything configurable is registered by name (see `registry`): `ADVANTAGE_ESTIMATORS`,
`POLICY_LOSSES`, `KL_PENALTIES`, `AGG_MODES`, `KL_CONTROLLERS`.
"""
from megatron_rl.algos.registry import (
    ADVANTAGE_ESTIMATORS, AGG_MODES, ESTIMATOR_ARGS, KL_CONTROLLERS, KL_PENALTIES, POLICY_LOSSES, Registry,
    get_advantage_estimator, get_agg_mode, get_kl_controller, get_policy_loss, register_advantage_estimator,
)
from megatron_rl.algos.checks import check_finite, set_finite_checks
from megatron_rl.algos.masked import masked_mean, masked_var, masked_whiten
from megatron_rl.algos.advantages import (
    gae_advantage, groups_with_signal, grpo_advantage, reinforce_pp_advantage, rloo_advantage,
)
from megatron_rl.algos.kl import (
    AdaptiveKLController, FixedKLController, get_kl_penalty, kl_controller, kl_penalised_rewards, kl_penalty,
)
from megatron_rl.algos.aggregation import agg_loss
from megatron_rl.algos.token_weights import APPLY_TO, align_token_weights, apply_token_weights
from megatron_rl.algos.policy_loss import gspo_policy_loss, ppo_policy_loss
from megatron_rl.algos.value_loss import entropy_from_logits, value_loss
from megatron_rl.algos.actor_loss import actor_loss
from megatron_rl.algos.vgr import gaussian_smooth, vgr_token_weights
from megatron_rl.algos.config import AlgosConfig

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGG_MODES", "ESTIMATOR_ARGS", "KL_CONTROLLERS", "KL_PENALTIES", "POLICY_LOSSES",
    "Registry", "get_advantage_estimator", "get_agg_mode", "get_kl_controller", "get_kl_penalty",
    "get_policy_loss", "register_advantage_estimator",
    "check_finite", "set_finite_checks", "masked_mean", "masked_var", "masked_whiten",
    "gae_advantage", "groups_with_signal", "grpo_advantage", "reinforce_pp_advantage", "rloo_advantage",
    "AdaptiveKLController", "FixedKLController", "kl_controller", "kl_penalised_rewards", "kl_penalty",
    "agg_loss", "APPLY_TO", "align_token_weights", "apply_token_weights",
    "gspo_policy_loss", "ppo_policy_loss", "entropy_from_logits", "value_loss", "actor_loss",
    "gaussian_smooth", "vgr_token_weights", "AlgosConfig",
]
