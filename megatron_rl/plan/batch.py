"""Batch arithmetic of a run: one meaning per batch-size key, checked once.

- `data.train_batch_size`: prompts per rollout step, GLOBAL (split over DP ranks; a
  GRPO group never straddles ranks).
- `rollout.n`: responses per prompt; samples per step = train_batch_size x n.
- `actor.mini_batch_size`: samples per optimizer step, GLOBAL (0 = the whole step);
  each DP rank takes mini_batch_size / dp of them. `critic.mini_batch_size` likewise
  (-1 = the actor's).
- `*.micro_batch_size`: rows per forward/backward on one rank (or, with
  `actor.max_tokens_per_microbatch` > 0, packed rows up to that many tokens).
- Optimizer steps per rollout = ppo_epochs x samples_per_step / mini_batch_size; the LR
  schedule's horizon is counted in optimizer steps (the scheduler steps once per
  optimizer step), over the rollout steps where the role actually updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rl.plan.layout import Layout, PlanError


@dataclass(frozen=True)
class BatchPlan:
    """The actor's view of one rollout step (the roles list has each role's own sizes)."""
    prompts_per_step: int
    samples_per_step: int
    prompts_per_dp_rank: int
    samples_per_dp_rank: int
    mini_batch_samples: int            # global, per optimizer step
    mini_batch_samples_per_rank: int
    mini_batches_per_epoch: int
    ppo_epochs: int
    optimizer_steps_per_rollout: int
    micro_batch_size: int
    max_tokens_per_microbatch: int     # 0: fixed micro_batch_size rows
    microbatches_per_mini_batch: int   # per rank (an upper-bound estimate when packing)
    max_sample_tokens: int             # prompt + response
    rollout_steps: int                 # trainer.total_steps
    lr_horizon_steps: int              # optimizer steps the LR schedule spans
    lr_warmup_steps: int


@dataclass(frozen=True)
class RolePlan:
    name: str
    kind: str                          # actor | reference | critic | discriminator | predictor
    trainable: bool
    offload: bool                      # kept in host memory between uses
    placement: str                     # gpu | cpu | host_offload
    micro_batch_size: int
    mini_batch_samples: int            # global per optimizer step (0: not trained)
    mini_batch_samples_per_rank: int
    optimizer_steps_per_rollout: int
    lr_horizon_steps: int


def response_tokens(cfg) -> int:
    if cfg.agent.enable:
        return cfg.agent.max_response_length
    return cfg.rollout.max_new_tokens


def split_mini_batch(key: str, mini: int, samples: int, dp: int) -> tuple[int, int]:
    """(global mini-batch, mini-batches per epoch) for `key` (0: the whole step)."""
    if mini < 0:
        raise PlanError(f"{key} must be >= 0 (0: the whole step), got {mini}")
    mini = mini or samples
    if mini > samples:
        raise PlanError(f"{key}={mini} exceeds the samples per step (data.train_batch_size x rollout.n = "
                        f"{samples})")
    if mini % dp:
        raise PlanError(f"{key}={mini} (global samples per optimizer step) is not divisible by the data-parallel "
                        f"size dp={dp}")
    if samples % mini:
        raise PlanError(f"samples per step (data.train_batch_size x rollout.n = {samples}) is not divisible by "
                        f"{key}={mini}")
    return mini, samples // mini


def actor_rl_rollouts(cfg) -> int:
    """Rollout steps in which the actor takes PPO/GRPO optimizer steps: the critic (or GAD
    discriminator) warm-up steps `trainer.critic_warmup` leave it out."""
    t = cfg.trainer
    warm = t.critic_warmup if (cfg.critic.enable or _gad(cfg)) else 0
    return max(0, t.total_steps - min(warm, t.total_steps))


def actor_sft_steps(cfg) -> int:
    """GAD warm-up with `warmup_student: sft` steps the actor's scheduler once per warm-up
    step (unless `gad.sft_lr` sets its own constant LR)."""
    if not _gad(cfg) or cfg.gad.warmup_student != "sft" or cfg.gad.sft_lr is not None:
        return 0
    return min(cfg.trainer.critic_warmup, cfg.trainer.total_steps)


def _gad(cfg) -> bool:
    return bool(cfg.gad.enable)


def resolve_batch(cfg, layout: Layout, actor_trainable: bool) -> BatchPlan:
    d, r, a = cfg.data, cfg.rollout, cfg.actor
    dp = layout.dp
    prompts, n = d.train_batch_size, r.n
    if n < 1:
        raise PlanError(f"rollout.n must be >= 1, got {n}")
    if prompts % dp:
        raise PlanError(f"data.train_batch_size={prompts} (global prompts per step) is not divisible by the "
                        f"data-parallel size dp={dp} (world size {layout.world_size} / (model.tp * model.pp * "
                        f"model.cp) = {layout.tp} * {layout.pp} * {layout.cp})")
    samples = prompts * n
    if a.micro_batch_size < 1:
        raise PlanError(f"actor.micro_batch_size must be >= 1, got {a.micro_batch_size}")
    if a.ppo_epochs < 1:
        raise PlanError(f"actor.ppo_epochs must be >= 1, got {a.ppo_epochs}")
    sample_tokens = d.max_prompt_length + response_tokens(cfg)
    if a.max_tokens_per_microbatch < 0:
        raise PlanError(f"actor.max_tokens_per_microbatch must be >= 0, got {a.max_tokens_per_microbatch}")
    if 0 < a.max_tokens_per_microbatch < sample_tokens:
        raise PlanError(f"actor.max_tokens_per_microbatch={a.max_tokens_per_microbatch} is below the longest "
                        f"sample (data.max_prompt_length + response = {sample_tokens} tokens)")
    if actor_trainable:
        mini, per_epoch = split_mini_batch("actor.mini_batch_size", a.mini_batch_size, samples, dp)
        steps = a.ppo_epochs * per_epoch
        horizon = actor_rl_rollouts(cfg) * steps + actor_sft_steps(cfg)
    else:
        mini, per_epoch, steps, horizon = samples, 1, 0, 0
    per_rank = mini // dp
    if a.max_tokens_per_microbatch:
        micro = max(1, math.ceil(per_rank * sample_tokens / a.max_tokens_per_microbatch))
    else:
        micro = math.ceil(per_rank / a.micro_batch_size)
    return BatchPlan(prompts_per_step=prompts, samples_per_step=samples, prompts_per_dp_rank=prompts // dp,
                     samples_per_dp_rank=samples // dp, mini_batch_samples=mini, mini_batch_samples_per_rank=per_rank,
                     mini_batches_per_epoch=per_epoch, ppo_epochs=a.ppo_epochs, optimizer_steps_per_rollout=steps,
                     micro_batch_size=a.micro_batch_size, max_tokens_per_microbatch=a.max_tokens_per_microbatch,
                     microbatches_per_mini_batch=micro, max_sample_tokens=sample_tokens,
                     rollout_steps=cfg.trainer.total_steps, lr_horizon_steps=horizon,
                     lr_warmup_steps=a.optim.lr_warmup_steps)
