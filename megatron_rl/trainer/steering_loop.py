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
from megatron_rl.trainer.predictor_checkpoint import load_predictor_checkpoint, save_predictor_checkpoint
from megatron_rl.steering.predictor_trainer import StrengthPredictorTrainer
from megatron_rl.trainer import phases
from megatron_rl.trainer.checkpoint import find_checkpoint
from megatron_rl.trainer.loop import Trainer


@dataclass
class PredictorTrainer:
    cfg: object
    tokenizer: object
    data: object                    # PromptLoader
    engine: object                  # RolloutEngine whose model carries `steering`
    llm: object                     # frozen Policy (its model: no parameter requires grad)
    steering: object                # SteeringController attached to llm.model
    rewards: object                 # RewardManager
    logger: object                  # MetricsLogger
    predictor: StrengthPredictorTrainer
    step: int = 0
    val_before: float | None = None

    @property
    def n(self) -> int:
        return self.cfg.steering.predictor.n_samples

    def fit(self) -> tuple[float | None, float]:
        cfg = self.cfg.trainer
        self._maybe_resume()
        if self.val_before is None and cfg.val_before_train:
            self.val_before = self.validate()
            self.logger.log({"val/reward": self.val_before}, step=0)
        metrics: dict = {}
        while self.step < cfg.total_steps:
            self.step += 1
            metrics = self.train_step(self.step)
            if (cfg.val_every and self.step % cfg.val_every == 0) or self.step == cfg.total_steps:
                metrics["val/reward"] = self.validate()
            self.logger.log(metrics, step=self.step)
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.total_steps:
                self.save()
        return self.val_before, metrics.get("val/reward", float("nan"))

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
        metrics.update(Trainer.step_metrics(self, batch, t0))
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

    def validate(self) -> float:
        """Mean reward on the validation prompts, steered at the predictor's mean strength, decoded
        as `rollout.val_greedy` / `val_temperature` say (greedy by default)."""
        scores: list[float] = []
        for prompts in self.data.val_batches():
            scores += self.score(self.greedy(prompts, self.mean_strengths(prompts), greedy=False))
        return dp_mean(scores)

    def _generator(self, step: int) -> torch.Generator:
        """Strength noise seeded by (seed, step, DP rank): a resumed run draws the same strengths."""
        rank, _ = dp_rank_size()
        return torch.Generator().manual_seed(self.cfg.trainer.seed * 1_000_003 + step * 101 + rank)

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        state = {"data": self.data.state_dict(), "val_before": self.val_before}
        save_predictor_checkpoint(self.cfg.logging.run_dir, self.step, self.predictor.state_dict(), state,
                                  self.cfg.trainer.keep_last)

    def _maybe_resume(self) -> None:
        path = find_checkpoint(self.cfg.logging.run_dir, self.cfg.trainer.resume)
        if path is None:
            return
        pred_state, state = load_predictor_checkpoint(path)
        self.predictor.load_state_dict(pred_state)
        self.step = state["step"]
        self.data.load_state_dict(state["data"])
        self.val_before = state.get("val_before")
        print(f"resumed strength-predictor training from {path} at step {self.step}", flush=True)


def build_predictor_trainer(cfg) -> PredictorTrainer:
    """Frozen LLM (built like the reference role) + steering hook + engine + predictor."""
    import os

    import transformers

    from megatron_rl.config import to_dict
    from megatron_rl.data import PromptLoader
    from megatron_rl.logging import MetricsLogger
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rewards import RewardManager
    from megatron_rl.steering.build import build_steering
    from megatron_rl.steering.predictor_trainer import build_predictor
    from megatron_rl.trainer.build import build_reference
    from megatron_rl.trainer.main import build_engine, set_seed

    s, p = cfg.steering, cfg.steering.predictor
    if not (s.enable and p.enable):
        raise ValueError("build_predictor_trainer needs steering.enable and steering.predictor.enable")
    if cfg.rollout.n != p.n_samples:
        raise ValueError(f"rollout.n={cfg.rollout.n} but steering.predictor.n_samples={p.n_samples}: each prompt "
                         f"gets one rollout per sampled strength; set both to the same value")
    if cfg.model.pp > 1:
        raise NotImplementedError("strength-predictor training with model.pp > 1 (the prompt representation "
                                  "lives on one pipeline stage); use tp or data parallelism")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    init_distributed(tp=cfg.model.tp, pp=cfg.model.pp, vpp=cfg.model.vpp, seed=cfg.trainer.seed)
    set_seed(cfg.trainer.seed, cfg.trainer.deterministic)
    if not cfg.model.path:
        raise ValueError("model.path is required (an HF directory or a megatron-rl checkpoint)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    llm = build_reference(cfg)                      # frozen: requires_grad False, eval mode
    ctl = build_steering(s, llm.model)
    llm.steering = ctl
    names = [str(f) for f in s.feature_idxs] if s.mode != "global" else ["global"]
    hidden = llm.model.config.hidden_size
    _, trainer = build_predictor(p, hidden, ctl.intervention.n_strengths, frozen_llm=llm.model, feature_names=names)
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    logger = MetricsLogger(cfg.logging, total_steps=cfg.trainer.total_steps, run_config=to_dict(cfg))
    return PredictorTrainer(cfg=cfg, tokenizer=tokenizer, data=PromptLoader(cfg.data, tokenizer),
                            engine=build_engine(cfg, llm, tokenizer), llm=llm, steering=ctl,
                            rewards=RewardManager(cfg.reward), logger=logger, predictor=trainer)
