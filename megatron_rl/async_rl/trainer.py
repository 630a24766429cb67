"""GRPO/PPO with the engine on its own ranks (`rollout.placement: disaggregated`), in any
`trainer.async.mode`: the `Trainer` step unchanged, except where its batch comes from (the
pipeline's buffer instead of an in-process engine call), where the weights go after the update
(pushed to the rollout ranks, tagged with the new policy version) and what a checkpoint holds
(the buffer, drained first). The loop stays the same code as the colocated one, so
`mode: sync` (and `fully_async` with `max_staleness: 0`) reproduce it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.async_rl.pipeline import RolloutPipeline
from megatron_rl.trainer import phases
from megatron_rl.trainer.loop import Trainer


class RemoteEngine:
    """The trainer side's engine for validation: generation runs on the rollout ranks."""

    def __init__(self, pipeline: RolloutPipeline):
        self.pipeline = pipeline

    def generate(self, batch, sampling):
        return self.pipeline.generate(batch, sampling)

    def update_weights(self, named_tensors) -> None:
        raise RuntimeError("the rollout ranks' weights are pushed by AsyncTrainer.sync_engine_weights")

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


@dataclass
class AsyncTrainer(Trainer):
    pipeline: RolloutPipeline = None

    def fit(self):
        try:
            return super().fit()
        finally:
            self.pipeline.close()       # the rollout ranks stop serving and exit

    def resume(self) -> None:
        super().resume()
        self.pipeline.push_weights(self.actor, self.step, self.cfg.rollout.weight_sync_bucket_mb)  # version = step

    def rollout_round(self, step: int, round_: int = 0):
        with self.logger.timer("rollout"):
            batch, metrics = self.pipeline.take(step)
        with self.logger.timer("reward"):
            metrics.update(phases.rewards(self, batch))
        return batch, metrics

    def sync_engine_weights(self) -> dict[str, float]:
        with self.logger.timer("weight_sync"):
            return self.pipeline.push_weights(self.actor, self.step, self.cfg.rollout.weight_sync_bucket_mb)

    def save(self) -> None:
        self.pipeline.drain()
        super().save()

    def checkpoint_roles(self) -> dict[str, object]:
        return {**super().checkpoint_roles(), "async_buffer": self.pipeline}


def build_async_trainer(cfg, ctx, roles, **kwargs) -> AsyncTrainer:
    """Trainer rank 0 gets the bridge client (weights first under fully_async)."""
    from megatron_rl.async_rl.client import RolloutClient
    from megatron_rl.async_rl.world import active_placement

    placement = active_placement()
    client = None
    if placement.bridge is not None:
        client = RolloutClient(placement.bridge, weights_first=ctx.plan.rollout.async_mode == "fully_async")
    pipeline = RolloutPipeline(cfg, ctx.plan, ctx.data, client, phases.sampling_params)
    return AsyncTrainer(**vars(ctx), roles=roles, engine=RemoteEngine(pipeline), pipeline=pipeline, **kwargs)


def split_or_serve(cfg) -> bool:
    """Under `rollout.placement: disaggregated`: split the world; on a rollout rank serve the
    trainer until it stops and return True (the process is done), on a trainer rank return False."""
    import os

    from megatron_rl.async_rl.worker import run_rollout_rank
    from megatron_rl.async_rl.world import split_world
    from megatron_rl.plan import resolve_plan
    from megatron_rl.trainer.bootstrap import plan_device

    # every rank checks the plan first, so a refused option stops the rollout ranks too
    resolve_plan(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)), device=plan_device())
    placement = split_world(cfg.rollout.num_ranks)
    if placement.role == "trainer":
        return False
    run_rollout_rank(cfg, placement)
    return True
