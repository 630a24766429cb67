"""Which roles a run builds, and each role's batch sizes, optimizer steps and placement.

- actor: always; frozen (not trainable) under the steering-predictor recipe.
- reference: `ref.enable`, or (when that is null) a KL term (`algos.use_kl_loss`,
  `algos.use_kl_in_reward`); `ref.offload` keeps it in host memory between uses (GPU only).
- critic: `critic.enable`; its own micro/mini-batch sizes and epochs.
- discriminator: `gad.enable`; `gad.d_updates` whole-batch optimizer steps per rollout,
  none after `gad.freeze_discriminator_after`.
- predictor: `steering.enable and steering.predictor.enable`; one step per rollout.
- reward_model: `reward.model.path` (GRPO/PPO recipes); frozen, its own shape (read from
  its config.json for the memory planner), `reward.model.offload` on GPU only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rl.plan.batch import BatchPlan, RolePlan, split_mini_batch
from megatron_rl.plan.layout import Layout, PlanError


@dataclass(frozen=True)
class RewardModelRolePlan(RolePlan):
    """The reward model's role with its own shape (None where its config.json is not here)."""
    shape: object = None               # plan.memory.Shape
    shape_source: str = ""


def reward_model_role(cfg, layout: Layout) -> RewardModelRolePlan | None:
    rm = cfg.reward.model
    if not rm.path:
        return None
    if recipe(cfg) not in ("grpo", "ppo"):
        raise PlanError(f"reward.model.path with the {recipe(cfg)} recipe: the reward model scores the "
                        f"GRPO/PPO reward phase only; unset reward.model.path")
    if layout.vpp is not None:
        raise PlanError(f"reward.model.path with model.vpp={layout.vpp}: the reward model runs on one model "
                        f"chunk; use model.vpp=null")
    shape, source = reward_model_shape(rm.path)
    off = bool(rm.offload and layout.device == "cuda")
    return RewardModelRolePlan("reward_model", "reward_model", trainable=False, offload=off,
                               placement=_placement(layout, off), micro_batch_size=rm.micro_batch_size,
                               mini_batch_samples=0, mini_batch_samples_per_rank=0, optimizer_steps_per_rollout=0,
                               lr_horizon_steps=0, shape=shape, shape_source=source)


def reward_model_shape(path: str):
    """(memory-planner Shape | None, source) of a sequence-classification checkpoint."""
    from pathlib import Path

    if not (Path(path) / "config.json").exists():
        return None, f"unknown: reward.model.path {path!r} has no config.json here"
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.plan.memory import shape_from_arch
    from megatron_rl.rewards.reward_model import trunk_hf_config
    try:
        return shape_from_arch(arch_from_hf_config(trunk_hf_config(path))), f"hf checkpoint {path}"
    except ValueError as e:
        raise PlanError(f"reward.model.path: {e}") from None


def reference_needed(cfg) -> bool:
    if cfg.ref.enable is not None:
        return bool(cfg.ref.enable)
    return bool(cfg.algos.use_kl_loss or cfg.algos.use_kl_in_reward)


def predictor_recipe(cfg) -> bool:
    return bool(cfg.steering.enable and cfg.steering.predictor.enable)


def recipe(cfg) -> str:
    """The recipe `megatron-rl train` runs (trainer/main.py `RECIPES` dispatches on this name)."""
    if cfg.gad.enable:
        return "gad"
    if predictor_recipe(cfg):
        return "steering_predictor"
    return "ppo" if cfg.critic.enable else "grpo"


def _placement(layout: Layout, offload: bool) -> str:
    if layout.device == "cpu":
        return "cpu"
    return "host_offload" if offload else "gpu"


def check_chunked_roles(cfg, layout: Layout, batch: BatchPlan) -> None:
    """Under `model.vpp` the actor and reference are chunk lists (interleaved schedule); the
    roles and phases that read one model chunk are refused by name, and so is a micro-batch
    count Megatron's interleaved schedule cannot run (a multiple of PP, fixed per step)."""
    if layout.vpp is None:
        return
    if cfg.actor.max_tokens_per_microbatch > 0:
        raise PlanError(f"model.vpp={layout.vpp} with actor.max_tokens_per_microbatch > 0: packed micro-batch "
                        f"counts vary per step, and the interleaved schedule needs a multiple of model.pp; "
                        f"set actor.max_tokens_per_microbatch=0")
    counts = {"per optimizer step (actor.mini_batch_size / dp / actor.micro_batch_size)":
              batch.microbatches_per_mini_batch,
              "per log-prob pass (data.train_batch_size x rollout.n / dp / actor.micro_batch_size)":
              math.ceil(batch.samples_per_dp_rank / batch.micro_batch_size)}
    for what, n_mb in counts.items():
        if n_mb % layout.pp:
            raise PlanError(f"model.vpp={layout.vpp}: {n_mb} micro-batches {what} is not a multiple of "
                            f"model.pp={layout.pp}, which Megatron's interleaved schedule needs; change "
                            f"actor.micro_batch_size or the batch sizes")
    single_chunk = {"critic.enable": cfg.critic.enable, "gad.enable": cfg.gad.enable,
                    "token_weights.source=vgr": cfg.token_weights.source == "vgr"}
    bad = [k for k, on in single_chunk.items() if on]
    if bad:
        raise PlanError(f"model.vpp={layout.vpp} with {', '.join(bad)}: the value-head roles (critic, GAD "
                        f"discriminator) and the VGR attention pass run on one model chunk; use model.vpp=null")


def resolve_roles(cfg, layout: Layout, batch: BatchPlan) -> tuple[RolePlan, ...]:
    check_chunked_roles(cfg, layout, batch)
    frozen_llm = predictor_recipe(cfg)
    dp, samples = layout.dp, batch.samples_per_step
    roles = [RolePlan("actor", "actor", trainable=not frozen_llm, offload=False, placement=_placement(layout, False),
                      micro_batch_size=batch.micro_batch_size,
                      mini_batch_samples=batch.mini_batch_samples if not frozen_llm else 0,
                      mini_batch_samples_per_rank=batch.mini_batch_samples_per_rank if not frozen_llm else 0,
                      optimizer_steps_per_rollout=batch.optimizer_steps_per_rollout,
                      lr_horizon_steps=batch.lr_horizon_steps)]
    if reference_needed(cfg):
        if frozen_llm:
            raise PlanError("ref.enable / algos.use_kl_loss / algos.use_kl_in_reward: the steering-predictor "
                            "recipe (steering.predictor.enable) keeps the LLM frozen and has no KL term or "
                            "reference; turn them off")
        off = bool(cfg.ref.offload and layout.device == "cuda")
        roles.append(RolePlan("reference", "reference", trainable=False, offload=off,
                              placement=_placement(layout, off), micro_batch_size=batch.micro_batch_size,
                              mini_batch_samples=0, mini_batch_samples_per_rank=0, optimizer_steps_per_rollout=0,
                              lr_horizon_steps=0))
    c = cfg.critic
    if c.enable:
        if c.ppo_epochs < 1:
            raise PlanError(f"critic.ppo_epochs must be >= 1, got {c.ppo_epochs}")
        key, mini = ("critic.mini_batch_size", c.mini_batch_size)
        if mini == -1:
            key, mini = "actor.mini_batch_size (critic.mini_batch_size: -1)", cfg.actor.mini_batch_size
        mini, per_epoch = split_mini_batch(key, mini, samples, dp)
        steps = c.ppo_epochs * per_epoch
        roles.append(RolePlan("critic", "critic", trainable=True, offload=False, placement=_placement(layout, False),
                              micro_batch_size=c.micro_batch_size or batch.micro_batch_size,
                              mini_batch_samples=mini, mini_batch_samples_per_rank=mini // dp,
                              optimizer_steps_per_rollout=steps, lr_horizon_steps=cfg.trainer.total_steps * steps))
    g = cfg.gad
    if g.enable:
        total = cfg.trainer.total_steps
        trained = total if g.freeze_discriminator_after is None else min(total, g.freeze_discriminator_after)
        roles.append(RolePlan("discriminator", "discriminator", trainable=True, offload=False,
                              placement=_placement(layout, False), micro_batch_size=g.d_micro_batch_size,
                              mini_batch_samples=samples, mini_batch_samples_per_rank=samples // dp,
                              optimizer_steps_per_rollout=g.d_updates, lr_horizon_steps=trained * g.d_updates))
    if frozen_llm:
        p = cfg.steering.predictor
        if cfg.rollout.n != p.n_samples:
            raise PlanError(f"rollout.n={cfg.rollout.n} must equal steering.predictor.n_samples={p.n_samples} "
                            "(one GRPO group of sampled strengths per prompt)")
        roles.append(RolePlan("predictor", "predictor", trainable=True, offload=False,
                              placement=_placement(layout, False), micro_batch_size=batch.samples_per_dp_rank,
                              mini_batch_samples=samples, mini_batch_samples_per_rank=samples // dp,
                              optimizer_steps_per_rollout=1, lr_horizon_steps=cfg.trainer.total_steps))
    rm = reward_model_role(cfg, layout)
    if rm is not None:
        roles.append(rm)
    return tuple(roles)
