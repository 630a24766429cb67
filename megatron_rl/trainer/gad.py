"""Generative adversarial distillation (GAD): black-box on-policy distillation.

Each step: the student (actor) samples n responses per prompt; the discriminator
scores them and the prompt's teacher response; D(student) is the student's reward;
D takes a Bradley-Terry step (teacher above student); the student takes a GRPO/GSPO
step (`algos.*`, KL to the reference included). For the first
`trainer.critic_warmup` steps only D learns while the student waits or learns the
teacher responses by cross-entropy (`gad.warmup_student`).

Wiring: `megatron_rl.trainer.main.build_trainer` hands over to `build_gad_trainer`
when `cfg.gad.enable` is true.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.data.readers import DataError
from megatron_rl.logging.values import MeanOver, Summed
from megatron_rl.parallel.data_parallel import dp_mean, reduce_metrics
from megatron_rl.rewards.token_rewards import to_token_rewards
from megatron_rl.trainer import phases
from megatron_rl.trainer.discriminator import pair_with_teachers, scoring_batch
from megatron_rl.trainer.loop import Trainer


# --- teacher responses ---------------------------------------------------------------
def teacher_key(cfg) -> str:
    return cfg.gad.teacher_key or cfg.data.teacher_response_key or "teacher_response"


def split_missing_teacher(prompts: Batch, key: str, skip: bool) -> tuple[Batch, int]:
    """(prompts that have a teacher response, number skipped); without `skip` a
    missing one is an error naming the sample's file:line."""
    keep = [i for i, s in enumerate(prompts.samples) if isinstance(s.get(key), str)]
    if len(keep) < len(prompts) and not skip:
        bad = prompts.samples[next(i for i in range(len(prompts)) if i not in keep)]
        raise DataError(f"{bad.get('uid', '?')}: no teacher response (string field '{key}') for GAD; "
                        f"add it or set gad.skip_missing_teacher=true")
    return (prompts if len(keep) == len(prompts) else prompts.select(keep)), len(prompts) - len(keep)


def tokenize_teacher(tokenizer, texts: list[str], max_tokens: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] long, mask [B, T] float), right-padded like rolled-out responses:
    the text without chat template (the prompt ends in the generation prompt) + EOS,
    cut at `max_tokens`."""
    eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    rows = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        rows.append((ids + ([eos] if eos is not None else []))[:max_tokens])
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    return ids, mask


def group_keys(prompts: Batch) -> list:
    """The group each prompt's students get from the engine (its uid, else its row)."""
    return [s.get("group", s.get("uid", i)) for i, s in enumerate(prompts.samples)]


def normalise_rewards(scores: torch.Tensor, groups: list, mode: str, eps: float = 1e-6) -> torch.Tensor:
    if mode == "none":
        return scores
    out = scores.clone()
    for g in set(groups):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        s = scores[idx]
        out[idx] = (s - s.mean()) / (s.std(unbiased=False) + eps) if len(idx) > 1 else s - s.mean()
    return out


# --- the trainer -----------------------------------------------------------------------
@dataclass
class GADTrainer(Trainer):
    """The GRPO recipe with the discriminator role: D(student) is the reward."""
    skipped_no_teacher: int = 0

    @property
    def discriminator(self):
        return self.roles.discriminator

    def _next_prompts(self) -> tuple[Batch, int]:
        g = self.cfg.gad
        skipped = 0
        for _ in range(1000):
            prompts, n = split_missing_teacher(self.data.next_batch(), teacher_key(self.cfg), g.skip_missing_teacher)
            skipped += n
            # Redraw in lockstep: every DP rank keeps its sampler at the same position, so all
            # redraw when any rank's shard has no teacher response.
            if dp_mean([float(len(prompts) > 0)]) == 1.0:
                return prompts, skipped
        raise DataError("gad: 1000 batches in a row without a teacher response; check gad.teacher_key")

    def teacher_batch(self, prompts: Batch) -> Batch:
        g, r = self.cfg.gad, self.cfg.rollout
        texts = [s[teacher_key(self.cfg)] for s in prompts.samples]
        ids, mask = tokenize_teacher(self.tokenizer, texts, g.max_teacher_tokens or r.max_new_tokens,
                                     self.data.pad_id)
        return scoring_batch(prompts, ids, mask)

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        g = self.cfg.gad
        warmup = step <= self.cfg.trainer.critic_warmup
        prompts, skipped = self._next_prompts()
        self.skipped_no_teacher += skipped
        # each DP rank skips within its own shard: the global count is the sum over ranks
        metrics = {"gad/skipped_no_teacher": Summed(self.skipped_no_teacher), "gad/warmup": float(warmup)}
        metrics.update(self.offload_training_state())       # actor.offload_during_rollout, as in Trainer
        with self.logger.timer("rollout"):
            batch = phases.rollout(self, prompts, step)
        metrics.update(self.onload_training_state())
        teachers = self.teacher_batch(prompts)
        attn = batch.get("response_attention_mask", batch["response_mask"]).float()
        students = scoring_batch(batch, batch["response_ids"], attn)
        pair = pair_with_teachers(batch.field("group"), group_keys(prompts))
        with self.logger.timer("reward"):
            rule = torch.zeros(len(batch))
            if g.log_rule_reward or g.rule_reward_weight:
                metrics.update(phases.rewards(self, batch))
                rule = batch["token_rewards"].sum(-1)
                metrics["gad/rule_score"] = MeanOver(rule.mean().item(), len(rule))
            s_scores, t_scores = self.discriminator.scores(students), self.discriminator.scores(teachers)
            reward = normalise_rewards(s_scores, batch.field("group"), g.reward_norm) + g.rule_reward_weight * rule
            batch["token_rewards"] = to_token_rewards(reward, batch["response_mask"])
            metrics.update({"reward/mean": MeanOver(reward.mean().item(), len(reward)),
                            "reward/max": reward.max().item(), "reward/min": reward.min().item()})
        d_frozen = g.freeze_discriminator_after is not None and step > g.freeze_discriminator_after
        with self.logger.timer("discriminator"):
            if d_frozen:
                metrics.update(self.discriminator.evaluate(s_scores, t_scores, pair))
            for k in range(0 if d_frozen else g.d_updates):
                metrics.update(self.discriminator.update(students, teachers, pair,
                                                         *((s_scores, t_scores) if k == 0 else ())))
        if warmup:
            if g.warmup_student == "sft":
                with self.logger.timer("update"):
                    sft = Batch({**{k: teachers[k] for k in ("prompt_ids", "prompt_mask", "response_ids")},
                                 "response_mask": teachers["response_mask"]})
                    metrics.update(self.actor.sft_step(sft, g.sft_lr))
        else:
            with self.logger.timer("logprob"):
                metrics.update(phases.logprobs(self, batch))
            if self.reference is not None:
                with self.logger.timer("ref_logprob"):
                    phases.ref_logprobs(self, batch)
            with self.logger.timer("advantage"):
                metrics.update(phases.advantages(self, batch))
            with self.logger.timer("update"):
                metrics.update(phases.update_actor(self, batch, step))
        metrics.update(self.sync_engine_weights())
        metrics = reduce_metrics(metrics)
        metrics.update(self.step_metrics(batch, t0))
        return metrics

    # --- validation: the rule reward and the discriminator's view of greedy responses ---
    def validate(self) -> dict[str, float]:
        return {**super().validate(), **self.validate_discriminator()}

    def validate_discriminator(self) -> dict[str, float]:
        """`val/d_score`: D's mean score of greedy student responses to the validation
        prompts (the reward the student chases, on held-out prompts). Where validation
        prompts carry teacher responses also `val/d_teacher_score` and `val/d_acc` (share
        of prompts with D(teacher) > D(student)). The rule reward stays `val/reward`."""
        key = teacher_key(self.cfg)
        student, teacher, correct = [], [], []
        for prompts in self.data.val_batches():
            batch = self.engine.generate(prompts, phases.sampling_params(self.cfg, 0, validation=True))
            attn = batch.get("response_attention_mask", batch["response_mask"]).float()
            s = self.discriminator.scores(scoring_batch(batch, batch["response_ids"], attn))
            student += s.tolist()
            with_teacher, _ = split_missing_teacher(prompts, key, skip=True)
            if len(with_teacher) == 0:
                continue
            t = self.discriminator.scores(self.teacher_batch(with_teacher))
            where = {g: i for i, g in enumerate(group_keys(with_teacher))}
            rows = [(i, where[g]) for i, g in enumerate(batch.field("group")) if g in where]
            teacher += t.tolist()
            correct += [float(t[j] > s[i]) for i, j in rows]
        out = {"val/d_score": dp_mean(student)}
        if dp_mean([1.0] * len(teacher)) > 0:      # some rank had teacher responses
            out.update({"val/d_teacher_score": dp_mean(teacher), "val/d_acc": dp_mean(correct)})
        return out

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "skipped_no_teacher": self.skipped_no_teacher}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self.skipped_no_teacher = int(state.get("skipped_no_teacher", 0))


def build_gad_trainer(cfg) -> GADTrainer:
    """The GRPO recipe's roles plus the discriminator. The dataset itself is told nothing
    of teacher responses (every record field is kept), so a missing one can be skipped."""
    from megatron_rl.trainer.bootstrap import bootstrap, build_engine
    from megatron_rl.trainer.discriminator import build_discriminator
    from megatron_rl.trainer.build import build_kl_controller, build_policy_roles

    if cfg.critic.enable:
        raise ValueError("gad.enable and critic.enable are both true: GAD's value model is its discriminator "
                         "(advantages are GRPO); set critic.enable=false")
    key = teacher_key(cfg)
    cfg = dataclasses.replace(cfg, gad=dataclasses.replace(cfg.gad, teacher_key=key),
                              data=dataclasses.replace(cfg.data, teacher_response_key=None))
    ctx = bootstrap(cfg)
    roles = build_policy_roles(cfg, ctx.plan)
    roles.discriminator = build_discriminator(cfg, ctx.plan.role("discriminator").lr_horizon_steps)
    return GADTrainer(**vars(ctx), roles=roles, engine=build_engine(cfg, roles.actor, ctx.tokenizer),
                      kl_ctrl=build_kl_controller(cfg))
