"""The outer loop every recipe shares (`RecipeLoop.fit`), and the GRPO/PPO recipe.

A recipe is a `RecipeLoop` with its roles, a `train_step`, a `validate` and the state it
checkpoints; resume, validation cadence, logging and atomic checkpoints live here once.
The GRPO/PPO step reads top to bottom: each phase is a function in `phases.py`, timed,
and the reference's offload/onload is visible where it happens.
"""
from __future__ import annotations

import functools
import math
import time
import dataclasses
from dataclasses import dataclass

from megatron_rl.parallel.data_parallel import reduce_metrics
from megatron_rl.trainer import dynamic_sampling, phases
from megatron_rl.trainer.bootstrap import RunContext
from megatron_rl.trainer.checkpoint import CheckpointManager
from megatron_rl.trainer.faults import fault_point
from megatron_rl.trainer.roles import Roles
from megatron_rl.trainer.update_steps import BadStepGuard


@dataclass
class RecipeLoop(RunContext):
    """A recipe: the run context (config, plan, tokenizer, data, rewards, logger), its roles
    and engine. Subclasses define `train_step(step) -> metrics`, `validate() -> metrics` (with
    `val/reward`), and may extend `trainer_state` / `load_trainer_state` and
    `checkpoint_roles`. Built as `Recipe(**vars(bootstrap(cfg)), roles=..., engine=...)`."""
    roles: Roles = None
    engine: object = None           # rollout.RolloutEngine
    step: int = 0
    val_before: float | None = None
    bad_steps: BadStepGuard = None  # trainer.max_bad_steps: skipped optimizer steps in a row
    guarded_metrics = "actor"       # whose `{prefix}/skipped_steps` the guard counts (class attribute)

    @functools.cached_property
    def checkpoints(self) -> CheckpointManager:
        """One per run: it holds the asynchronous save in flight (`trainer.async_save`)."""
        return CheckpointManager(self.cfg.logging.run_dir, self.cfg.trainer.keep_last,
                                 plan=self.plan.to_dict() if self.plan is not None else None,
                                 async_save=self.cfg.trainer.async_save)

    def fit(self) -> tuple[float | None, float]:
        t = self.cfg.trainer
        self.bad_steps = self.bad_steps or BadStepGuard(t.max_bad_steps)
        self.resume()
        if self.val_before is None and t.val_before_train:
            val = self.validate()
            self.val_before = val["val/reward"]
            self.logger.log(val, step=0)
        metrics: dict[str, float] = {}
        while self.step < t.total_steps:
            self.step += 1
            last = self.step == t.total_steps
            fault_point("step")
            self.checkpoints.poll()             # publishes an async save whose write has finished
            metrics = self.train_step(self.step)
            self.bad_steps.update(metrics, self.step, self.guarded_metrics)
            if (t.val_every and self.step % t.val_every == 0 and not last) or (last and t.final_validation):
                metrics.update(self.validate())
            self.logger.log(metrics, step=self.step)
            if (t.save_every and self.step % t.save_every == 0) or (last and t.save_final):
                self.save()
        self.checkpoints.finalize()             # an async save in flight is published before the run ends
        return self.val_before, metrics.get("val/reward", math.nan)

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    # --- checkpoints ------------------------------------------------------------------
    def checkpoint_roles(self) -> dict[str, object]:
        """The roles whose state a checkpoint holds: the trained ones (frozen roles are
        rebuilt from `model.path`)."""
        return {k: v for k, v in self.roles.present().items() if k != "reference"}

    def trainer_state(self) -> dict:
        return {"data": self.data.state_dict(), "val_before": self.val_before,
                "bad_steps_in_a_row": self.bad_steps.in_a_row if self.bad_steps else 0}

    def load_trainer_state(self, state: dict) -> None:
        self.step = state["step"]
        self.data.load_state_dict(state["data"])
        self.val_before = state.get("val_before")
        if self.bad_steps is not None:
            self.bad_steps.in_a_row = int(state.get("bad_steps_in_a_row", 0))

    def save(self) -> None:
        self.checkpoints.save(self.step, self.checkpoint_roles(), self.trainer_state())

    def resume(self) -> None:
        path = self.checkpoints.find(self.cfg.trainer.resume)
        if path is None:
            return
        self.load_trainer_state(self.checkpoints.restore(path, self.checkpoint_roles()))
        print(f"resumed from {path} at step {self.step}", flush=True)

    def step_metrics(self, batch, t0: float) -> dict[str, float]:
        """Step time, throughput and epoch."""
        elapsed = time.time() - t0
        tokens = float(batch["response_mask"].sum() + batch["prompt_mask"].sum())
        return {"timing/step": elapsed, "perf/tokens_per_s": tokens / elapsed, "train/epoch": float(self.data.epoch)}

    def sync_engine_weights(self) -> dict[str, float]:
        """Push the updated actor weights into an engine that holds its own copy (vLLM).
        The native engine shares the actor's modules, so it has no `sync_weights`."""
        sync = getattr(self.engine, "sync_weights", None)
        if sync is None:
            return {}
        with self.logger.timer("weight_sync"):
            return sync(self.roles.actor)


@dataclass
class Trainer(RecipeLoop):
    """GRPO / PPO (with a critic for GAE) / GSPO / RLOO ...: (offload) rollout (onload) -> rewards ->
    old/ref log-probs (the old ones skipped when the plan says on-policy) -> (values) -> advantages ->
    (token weights) -> update -> weight sync."""
    kl_ctrl: object = None                  # algos.kl controller
    token_weights: object = None            # callable(trainer, batch) -> metrics; sets batch["token_weights"]

    @property
    def actor(self):
        return self.roles.actor

    @property
    def reference(self):
        return self.roles.reference

    @property
    def critic(self):
        return self.roles.critic

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        metrics: dict[str, float] = {}
        batch, generated = dynamic_sampling.collect(self, step)   # rollout_round once, or until groups suffice
        metrics.update(generated)
        if self.plan.old_logprob.separate_pass or self.plan.old_logprob.source == "rollout":
            with self.logger.timer("logprob"):
                metrics.update(phases.logprobs(self, batch))
        # else exactly on-policy: the update's own forward gives the old log-probs (plan/passes.py)
        if self.reference is not None:
            with self.logger.timer("ref_logprob"):
                phases.ref_logprobs(self, batch)
        if self.critic is not None:
            with self.logger.timer("values"):
                batch["values"] = self.critic.compute_values(batch)
        with self.logger.timer("advantage"):
            metrics.update(phases.advantages(self, batch))
        if self.token_weights is not None:
            with self.logger.timer("token_weights"):
                metrics.update(self.token_weights(self, batch))
        if self.critic is None or step > self.cfg.trainer.critic_warmup:   # warm-up: only the critic learns
            with self.logger.timer("update"):
                metrics.update(phases.update_actor(self, batch, step))
        if self.critic is not None:
            with self.logger.timer("critic"):
                own = dataclasses.replace(self.cfg.critic,   # the plan's per-rank share of critic.mini_batch_size
                                          mini_batch_size=self.plan.role("critic").mini_batch_samples_per_rank)
                metrics.update(self.critic.update(batch, self.cfg.algos, own, seed=self.cfg.trainer.seed + step))
        metrics.update(self.sync_engine_weights())
        metrics = reduce_metrics(metrics)
        metrics.update(self.step_metrics(batch, t0))
        return metrics

    def rollout_round(self, step: int, round_: int = 0):
        """One generation round: prompts -> (offload) rollout (onload) -> rewards; (batch, metrics)."""
        metrics: dict[str, float] = {}
        prompts = self.data.next_batch()
        metrics.update(self.offload_training_state())       # actor.offload_during_rollout: the engine's GPU
        with self.logger.timer("rollout"):
            batch = phases.rollout(self, prompts, step, round_)
        metrics.update(self.onload_training_state())
        metrics.update(getattr(self.engine, "last_metrics", None) or {})   # e.g. agent/* from the tool loop
        with self.logger.timer("reward"):
            metrics.update(phases.rewards(self, batch))
        return batch, metrics

    def validate(self) -> dict[str, float]:
        return {"val/reward": phases.validate(self)}

    # --- the actor's training state while the engine generates (actor.offload_during_rollout) ---
    def offload_training_state(self) -> dict[str, float]:
        """The actor role's offloader (trainer/build.py builds one when the plan says so)."""
        if self.actor is None or self.actor.offloader is None:
            return {}
        with self.logger.timer("offload"):
            stats = self.actor.offload()
        return {"perf/offload_freed_gib": stats.bytes_freed / 2**30}

    def onload_training_state(self) -> dict[str, float]:
        if self.actor is None or self.actor.offloader is None:
            return {}
        with self.logger.timer("onload"):
            self.actor.onload()
        return {}

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "kl_ctrl": self.kl_ctrl.state_dict()}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        if state.get("kl_ctrl"):
            self.kl_ctrl.load_state_dict(state["kl_ctrl"])
