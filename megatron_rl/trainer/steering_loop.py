"""`megatron-rl train` with `steering.predictor.enable`: learn per-prompt steering strengths while
the LLM stays frozen.

One step: the predictor reads each prompt's representation (the frozen LLM's hidden state at
`predictor.repr_layer`, steering off) and samples `n_samples` strengths per prompt; the engine
generates one steered rollout per sample (per-sample `steer_strengths`); the task reward scores
them; the n rewards of a prompt form a GRPO group and the predictor takes one policy-gradient
step. Every `predictor.compare_every` steps the same prompts are also decoded greedily with
steering at the predictor's mean strength and without steering: `steering/reward_steered`,
`steering/reward_unsteered`, `steering/reward_gain`, `steering/frac_tokens_changed`.
Validation (before/after, `trainer.val_every`) is steered at the mean strength.

Wiring: `megatron_rl.trainer.main.train_main` calls `build_predictor_trainer(cfg)`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.parallel.data_parallel import dp_mean, dp_rank_size, reduce_metrics
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.steering.compare import frac_tokens_changed
from megatron_rl.steering.predictor import group_index, prompt_repr
from megatron_rl.steering.predictor_trainer import StrengthPredictorTrainer
from megatron_rl.trainer import phases
from megatron_rl.trainer.loop import RecipeLoop


@dataclass
class PredictorTrainer(RecipeLoop):
    """Roles: `actor` is the frozen LLM (its model carries `steering`), `predictor` the
    strength predictor (the only trained role, the only one checkpointed)."""
    guarded_metrics = "steering"    # trainer.max_bad_steps counts the predictor's skipped steps

    @property
    def llm(self):
        return self.roles.actor

    @property
    def steering(self):
        return self.roles.actor.steering

    @property
    def predictor(self):
        return self.roles.predictor

    @property
    def n(self) -> int:
        return self.cfg.steering.predictor.n_samples

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        prompts = self.data.next_batch()
        with self.logger.timer("repr"):
            reprs = self.reprs(prompts)
        strengths, _ = self.predictor.predictor.sample(reprs, self.n, generator=self._generator(step))
        batch = prompts.repeat_interleave(self.n)
        for i, s in enumerate(batch.samples):
            s["group"] = i // self.n
        batch["steer_strengths"] = strengths
        with self.logger.timer("rollout"):
            batch = self.engine.generate(batch, dataclasses.replace(phases.sampling_params(self.cfg, step), n=1))
        with self.logger.timer("reward"):
            metrics = phases.rewards(self, batch)
        rewards = batch["token_rewards"].float().sum(-1)
        with self.logger.timer("update"):
            metrics.update(self.predictor.step(reprs, strengths, rewards, group_index(len(prompts), self.n)))
        with torch.no_grad():                                   # the policy mean after the update
            mean = self.predictor.predictor.mean(reprs).mean(0)
        metrics.update({f"steering/policy_mean/{f}": float(m) for f, m in zip(self.predictor.feature_names, mean)})
        every = self.cfg.steering.predictor.compare_every
        if every and step % every == 0:
            with self.logger.timer("compare"):
                metrics.update(self.compare(prompts, reprs))
        metrics = reduce_metrics(metrics)
        metrics.update(self.step_metrics(batch, t0))
        return metrics

    # --- pieces -------------------------------------------------------------------------------
    def reprs(self, prompts: Batch) -> torch.Tensor:
        p = self.cfg.steering.predictor
        layer = self.steering.layer if p.repr_layer < 0 else p.repr_layer
        return prompt_repr(self.llm.model, prompts["prompt_ids"], prompts["prompt_mask"], layer, p.repr,
                           steering=self.steering)

    def mean_strengths(self, prompts: Batch) -> torch.Tensor:
        with torch.no_grad():
            return self.predictor.predictor.mean(self.reprs(prompts))

    def greedy(self, prompts: Batch, strengths: torch.Tensor | None, greedy: bool = True) -> Batch:
        """One decode per prompt, steered with `strengths [B, F]` or unsteered when None; greedy, or
        with the validation sampling settings (`rollout.val_greedy`, `val_temperature`)."""
        sp = dataclasses.replace(phases.sampling_params(self.cfg, 0, validation=True), n=1)
        if greedy:
            sp = dataclasses.replace(sp, greedy=True)
        batch = prompts.select(range(len(prompts)))
        if strengths is None:
            with self.steering.disabled():
                return self.engine.generate(batch, sp)
        batch["steer_strengths"] = strengths
        return self.engine.generate(batch, sp)

    def score(self, batch: Batch) -> list[float]:
        return self.rewards.score(phases.decode_responses(self.tokenizer, batch), batch.samples).scores

    def compare(self, prompts: Batch, reprs: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            mean = self.predictor.predictor.mean(reprs)
        steered, base = self.greedy(prompts, mean), self.greedy(prompts, None)
        r_s = sum(self.score(steered)) / len(steered)
        r_u = sum(self.score(base)) / len(base)
        changed = frac_tokens_changed(steered["response_ids"], steered["response_mask"],
                                      base["response_ids"], base["response_mask"])
        return {"steering/reward_steered": r_s, "steering/reward_unsteered": r_u,
                "steering/reward_gain": r_s - r_u, "steering/frac_tokens_changed": changed}

    def validate(self) -> dict[str, float]:
        """Mean reward on the validation prompts, steered at the predictor's mean strength, decoded
        as `rollout.val_greedy` / `val_temperature` say (greedy by default)."""
        scores: list[float] = []
        for prompts in self.data.val_batches():
            scores += self.score(self.greedy(prompts, self.mean_strengths(prompts), greedy=False))
        return {"val/reward": dp_mean(scores)}

    def _generator(self, step: int) -> torch.Generator:
        """Strength noise seeded by (seed, step, DP rank): a resumed run draws the same strengths."""
        rank, _ = dp_rank_size()
        return torch.Generator().manual_seed(self.cfg.trainer.seed * 1_000_003 + step * 101 + rank)

    def checkpoint_roles(self) -> dict[str, object]:
        return {"predictor": self.predictor}     # the LLM is frozen: a resumed run reads model.path again


def build_predictor_trainer(cfg) -> PredictorTrainer:
    """Frozen LLM (built like the reference role) + steering hook + engine + predictor."""
    from megatron_rl.steering.build import build_steering
    from megatron_rl.steering.predictor_trainer import build_predictor
    from megatron_rl.trainer.bootstrap import bootstrap, build_engine
    from megatron_rl.trainer.build import build_frozen_policy
    from megatron_rl.trainer.roles import Roles

    s, p = cfg.steering, cfg.steering.predictor
    if not (s.enable and p.enable):
        raise ValueError("build_predictor_trainer needs steering.enable and steering.predictor.enable")
    if cfg.rollout.n != p.n_samples:
        raise ValueError(f"rollout.n={cfg.rollout.n} but steering.predictor.n_samples={p.n_samples}: each prompt "
                         f"gets one rollout per sampled strength; set both to the same value")
    if cfg.model.pp > 1:
        raise ValueError("model.pp > 1 with steering.predictor.enable: the prompt representation lives on one "
                         "pipeline stage; use model.tp or data parallelism")
    ctx = bootstrap(cfg)
    llm = build_frozen_policy(cfg, ctx.plan)                  # frozen: requires_grad False, eval mode
    llm.steering = ctl = build_steering(s, llm.model)
    names = [str(f) for f in s.feature_idxs] if s.mode != "global" else ["global"]
    _, predictor = build_predictor(p, llm.model.config.hidden_size, ctl.intervention.n_strengths,
                                   frozen_llm=llm.model, feature_names=names)
    return PredictorTrainer(**vars(ctx), roles=Roles(actor=llm, predictor=predictor),
                            engine=build_engine(cfg, llm, ctx.tokenizer))
