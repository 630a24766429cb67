"""`AlgosConfig`: the YAML section that selects and parameterises the RL algorithm.

Names are validated against the registries at construction, so a typo fails at
config load with the list of valid names, not mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.algos.registry import (ADVANTAGE_ESTIMATORS, AGG_MODES, KL_CONTROLLERS, POLICY_LOSSES,
                                        Registry)
from megatron_rl.algos.off_policy import OffPolicyConfig
from megatron_rl.algos.token_weights import APPLY_TO


@dataclass
class DynamicSamplingConfig:
    # DAPO dynamic sampling (trainer/dynamic_sampling.py): drop groups whose `metric` agrees on
    # every response (no signal) and keep generating until the step has data.train_batch_size
    # groups, at most max_num_gen_batches rounds (0: no cap); at the cap the missing groups are
    # filled with dropped ones whose loss mask is zeroed. metric: score (the reward incl. overlong
    # shaping; verl's seq_reward / seq_final_reward are accepted aliases) or an extra key the
    # reward returns (e.g. acc).
    enable: bool = False
    metric: str = "score"
    max_num_gen_batches: int = 10

    def __post_init__(self) -> None:
        if self.max_num_gen_batches < 0:
            raise ValueError("algos.dynamic_sampling.max_num_gen_batches must be >= 0 (0: no cap), "
                             f"got {self.max_num_gen_batches}")
        if not self.metric:
            raise ValueError("algos.dynamic_sampling.metric must name score or a reward's extra key")


@dataclass
class AlgosConfig:
    # Advantage estimation: a name in ADVANTAGE_ESTIMATORS and its parameters.
    adv_estimator: str = "grpo"
    gamma: float = 1.0
    lam: float = 1.0
    norm_by_std: bool = True          # False: Dr.GRPO (no std normalisation)
    adv_eps: float = 1e-6             # GRPO: (R - mean) / (std + adv_eps)

    # Policy loss: a name in POLICY_LOSSES. GSPO wants tiny clip ranges (paper: 3e-4 / 4e-4).
    policy_loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2            # > clip_low: DAPO clip-higher
    clip_c: float | None = 3.0        # dual-clip bound for negative advantages (None: off)
    loss_agg_mode: str = "token-mean"
    norm_len: int | None = None       # Dr.GRPO constant for seq-mean-token-sum-norm (None: response_len)

    # KL to the reference: as a loss term and/or inside the reward.
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_kind: str = "low_var_kl"  # any KL_PENALTIES name, '+' suffix for straight-through
    use_kl_in_reward: bool = False
    kl_in_reward_kind: str = "kl"
    kl_ctrl: str = "fixed"            # a name in KL_CONTROLLERS
    kl_coef: float = 0.001
    target_kl: float | None = None    # adaptive controller only
    kl_horizon: float | None = None   # adaptive controller only

    # Entropy bonus (the critic's value clip is `critic.cliprange_value`).
    entropy_coef: float = 0.0

    # Token weights: where they apply ("pg" or "mask", see algos.token_weights). VGR weights are
    # configured in the `token_weights:` section (the old `algos.vgr` section was removed).
    token_weights_apply_to: str = "pg"

    # DAPO: responses cut by rollout.max_new_tokens leave the loss (their response_mask is zeroed
    # after rewards and advantages' group statistics have seen them), and dynamic sampling.
    mask_truncated: bool = False
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)

    # Off-policy correction of rollouts whose behaviour policy is not the trainer's (FP8 / async
    # engines): truncated IS (tis) or band masking (mis) folded into token_weights (algos/off_policy.py).
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)

    def __post_init__(self) -> None:
        _check_name("algos.adv_estimator", self.adv_estimator, ADVANTAGE_ESTIMATORS)
        _check_name("algos.policy_loss", self.policy_loss, POLICY_LOSSES)
        _check_name("algos.loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        _check_name("algos.kl_ctrl", self.kl_ctrl, KL_CONTROLLERS)
        from megatron_rl.algos.kl import get_kl_penalty
        for key in ("kl_loss_kind", "kl_in_reward_kind"):
            try:
                get_kl_penalty(getattr(self, key))
            except ValueError as err:
                raise ValueError(f"algos.{key}: {err}") from None
        if self.token_weights_apply_to not in APPLY_TO:
            raise ValueError(f"algos.token_weights_apply_to must be one of {APPLY_TO}, "
                             f"got '{self.token_weights_apply_to}'")
        if not self.adv_eps > 0:
            raise ValueError(f"algos.adv_eps must be > 0, got {self.adv_eps}")
        if self.clip_c is not None and self.clip_c <= 1.0:
            raise ValueError(f"algos.clip_c must be > 1 (or null), got {self.clip_c}")
        if self.kl_ctrl == "adaptive" and (not self.target_kl or not self.kl_horizon):
            raise ValueError("algos.kl_ctrl 'adaptive' needs algos.target_kl > 0 and algos.kl_horizon > 0")

    def policy_loss_kwargs(self) -> dict:
        """The clip arguments `POLICY_LOSSES[self.policy_loss]` accepts (GSPO has no `clip_c`;
        a user-registered loss gets the ones its signature names)."""
        import inspect

        accepted = inspect.signature(POLICY_LOSSES.lookup(self.policy_loss)).parameters
        clip = {"clip_low": self.clip_low, "clip_high": self.clip_high, "clip_c": self.clip_c}
        return {k: v for k, v in clip.items() if k in accepted}

    def actor_loss_kwargs(self) -> dict:
        """The settings `algos.actor_loss` takes from this section (everything but the tensors
        and the KL coefficient, which depends on whether a reference exists): the one place
        the padded and the packed loss paths read them from."""
        return dict(policy_loss=self.policy_loss, policy_loss_kwargs=self.policy_loss_kwargs(),
                    agg_mode=self.loss_agg_mode, norm_len=self.norm_len,
                    token_weights_apply_to=self.token_weights_apply_to, kl_kind=self.kl_loss_kind,
                    entropy_coef=self.entropy_coef)


def _check_name(key: str, name: str, registry: Registry) -> None:
    try:
        registry.lookup(name)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
