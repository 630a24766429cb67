"""The training loop: it fits on one screen; each phase is a function in `phases.py`."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_rl.parallel.data_parallel import reduce_metrics
from megatron_rl.trainer import phases
from megatron_rl.trainer.checkpoint import (_rank, find_checkpoint, load_checkpoint_into,
                                            save_checkpoint)


@dataclass
class Trainer:
    cfg: object
    tokenizer: object
    data: object            # PromptLoader
    engine: object          # RolloutEngine
    actor: object           # Policy (trainable)
    reference: object       # Policy (frozen) or None
    rewards: object         # RewardManager
    kl_ctrl: object
    logger: object          # MetricsLogger
    token_weights: object = None  # callable(trainer, batch) -> metrics; sets batch["token_weights"]
    critic: object = None         # Critic (trainer/critic.py): values for GAE, updated after the actor
    step: int = 0
    val_before: float | None = None

    def fit(self) -> tuple[float | None, float]:
        cfg = self.cfg.trainer
        self._maybe_resume()
        if self.val_before is None and cfg.val_before_train:
            self.val_before = phases.validate(self)
            self.logger.log({"val/reward": self.val_before}, step=0)
        while self.step < cfg.total_steps:
            self.step += 1
            metrics = self.train_step(self.step)
            if cfg.val_every and self.step % cfg.val_every == 0 and self.step < cfg.total_steps:
                metrics["val/reward"] = phases.validate(self)
            if self.step == cfg.total_steps:
                metrics["val/reward"] = val_after = phases.validate(self)
            self.logger.log(metrics, step=self.step)
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.total_steps:
                self.save()
        return self.val_before, metrics.get("val/reward", float("nan")) if cfg.total_steps else float("nan")

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        metrics: dict[str, float] = {}
        prompts = self.data.next_batch()
        with self.logger.timer("rollout"):
            batch = phases.rollout(self, prompts, step)
        metrics.update(getattr(self.engine, "last_metrics", None) or {})   # e.g. agent/* from the tool loop
        with self.logger.timer("reward"):
            metrics.update(phases.rewards(self, batch))
        with self.logger.timer("logprob"):
            metrics.update(phases.logprobs(self, batch))
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
                metrics.update(self.critic.update(batch, self.cfg.algos, self.cfg.critic,
                                                  mini_batch_size=self.cfg.actor.mini_batch_size,
                                                  seed=self.cfg.trainer.seed + step))
        metrics.update(self.sync_engine_weights())
        metrics = reduce_metrics(metrics)
        metrics.update(self.step_metrics(batch, t0))
        return metrics

    def step_metrics(self, batch, t0: float) -> dict[str, float]:
        """Step time, throughput and epoch: shared by every trainer's `train_step`."""
        elapsed = time.time() - t0
        tokens = float(batch["response_mask"].sum() + batch["prompt_mask"].sum())
        return {"timing/step": elapsed, "perf/tokens_per_s": tokens / elapsed, "train/epoch": float(self.data.epoch)}

    def sync_engine_weights(self) -> dict[str, float]:
        """Push the updated actor weights into an engine that holds its own copy (vLLM).

        The native engine shares the actor's modules, so it has no `sync_weights`.
        """
        sync = getattr(self.engine, "sync_weights", None)
        if sync is None:
            return {}
        with self.logger.timer("weight_sync"):
            return sync(self.actor)

    def save(self) -> None:
        state = {"data": self.data.state_dict(), "kl_ctrl": _state(self.kl_ctrl), "val_before": self.val_before}
        save_checkpoint(self.cfg.logging.run_dir, self.step, self.actor, state, self.cfg.trainer.keep_last,
                        extra_states=self.extra_checkpoint_states())

    def extra_checkpoint_states(self) -> dict:
        """Models besides the actor, saved per rank inside the same atomic checkpoint."""
        return {"critic": self.critic.state_dict()} if self.critic is not None else {}

    def _maybe_resume(self) -> None:
        path = find_checkpoint(self.cfg.logging.run_dir, self.cfg.trainer.resume)
        if path is None:
            return
        state = load_checkpoint_into(path, self.actor)
        self.step = state["step"]
        self.data.load_state_dict(state["data"])
        if state.get("kl_ctrl") and hasattr(self.kl_ctrl, "load_state_dict"):
            self.kl_ctrl.load_state_dict(state["kl_ctrl"])
        self.val_before = state.get("val_before")
        if self.critic is not None:
            f = path / f"critic_rank{_rank():05d}.pt"
            if not f.exists():
                raise FileNotFoundError(f"{f}: checkpoint has no critic state for rank {_rank()} "
                                        f"(saved without critic.enable?)")
            self.critic.load_state_dict(torch.load(f, weights_only=False))
        print(f"resumed from {path} at step {self.step}", flush=True)


def _state(obj):
    return obj.state_dict() if hasattr(obj, "state_dict") else None
