"""The GAD discriminator: a GPTModel trunk + scalar head, trained with a Bradley-Terry
loss to score the teacher's response above the student's for the same prompt.

The update runs through Megatron's schedule, micro-batch by micro-batch, with an
exact surrogate: the BT loss couples a teacher row and a student row that may sit
in different micro-batches, so the scores are computed first (no grad; they are
also the student's reward), dL/dD is formed in closed form, and the backward pass
minimises `sum(dL/dD * D)` whose gradient equals the BT loss's (no dropout in D).
Each prompt's teacher response is scored once for its n students.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rl.data.batch import Batch
from megatron_rl.models.schedule import run_microbatches
from megatron_rl.models.value_head import attach_value_head, last_token_index
from megatron_rl.parallel.pipeline import broadcast_from_last_stage, broadcast_metrics
from megatron_rl.trainer.update_steps import optimizer_step
from megatron_rl.trainer.value_model import ValueModel


def bt_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of -log sigmoid(D(teacher) - D(student)), fraction of pairs with D(teacher) > D(student));
    both inputs [N], row i one pair."""
    diff = teacher_scores - student_scores
    return F.softplus(-diff).mean(), (diff > 0).float().mean()


def pair_with_teachers(student_groups: list, teacher_groups: list) -> torch.Tensor:
    """[N_students] index of each student's teacher row (same group = same prompt)."""
    where = {g: i for i, g in enumerate(teacher_groups)}
    missing = [g for g in student_groups if g not in where]
    if missing:
        raise KeyError(f"student groups {sorted(set(map(str, missing)))[:5]} have no teacher response "
                       f"(teacher groups: {sorted(map(str, teacher_groups))[:5]}...)")
    return torch.tensor([where[g] for g in student_groups], dtype=torch.long)


def scoring_batch(prompts: Batch, response_ids: torch.Tensor, response_attn: torch.Tensor) -> Batch:
    """The minimal batch the discriminator reads: prompt ++ response (mask = real tokens)."""
    return Batch({"prompt_ids": prompts["prompt_ids"], "prompt_mask": prompts["prompt_mask"],
                  "response_ids": response_ids, "response_mask": response_attn.float()},
                 [{} for _ in range(len(prompts))])


class Discriminator(ValueModel):
    """Built by `build_discriminator`; the shared trunk + head plumbing is in `value_model.py`."""

    @staticmethod
    def _last(values, mb) -> torch.Tensor:
        idx = last_token_index(mb["attention_mask"])
        return values.gather(1, idx[:, None]).squeeze(1)

    @torch.no_grad()
    def scores(self, batch: Batch) -> torch.Tensor:
        """[B] float32 score of each row's response, on every rank."""
        self.model.eval()
        mbs = self._microbatches(batch)
        res = run_microbatches([self.ddp], mbs, self._forward,
                               lambda mb, out: (out.sum() * 0, {"s": self._last(out, mb).float().cpu()}),
                               forward_only=True)
        self.model.train()
        n = len(batch)
        s = torch.cat([r["s"] for r in res])[:n] if res else None
        return broadcast_from_last_stage(s, (n,))

    @staticmethod
    def evaluate(student_scores: torch.Tensor, teacher_scores: torch.Tensor, pair: torch.Tensor) -> dict[str, float]:
        """The `critic/*` metrics of pairs without a step (a frozen discriminator)."""
        loss, acc = bt_loss(teacher_scores[pair], student_scores)
        return {"critic/d_loss": loss.item(), "critic/d_acc": acc.item(),
                "critic/student_value_mean": student_scores.mean().item(),
                "critic/teacher_value_mean": teacher_scores.mean().item()}

    def update(self, students: Batch, teachers: Batch, pair: torch.Tensor,
               student_scores: torch.Tensor | None = None,
               teacher_scores: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on the BT loss of pairs (teachers[pair[i]], students[i]).
        Pass the current scores if already computed (they are, for the reward)."""
        if student_scores is None:
            student_scores = self.scores(students)
        if teacher_scores is None:
            teacher_scores = self.scores(teachers)
        # d loss / d diff for diff = D(t) - D(s): -sigmoid(-diff) / N
        g = -torch.sigmoid(student_scores - teacher_scores[pair]) / len(pair)
        coef = torch.cat([torch.zeros(len(teachers)).index_add_(0, pair, g), -g])
        both = Batch.concat([teachers, students])
        mbs = self._microbatches(both)
        for k, mb in enumerate(mbs):
            c = torch.zeros(self.mbs)
            part = coef[k * self.mbs:(k + 1) * self.mbs]
            c[:len(part)] = part
            mb["coef"] = c.to(mb["input_ids"].device)
        n_mb = len(mbs)

        def loss_fn(mb, out):
            # Megatron divides each micro-batch loss by the number of micro-batches
            return (mb["coef"] * self._last(out, mb)).sum() * n_mb, {}

        self.model.train()
        _, step = optimizer_step(self.ddp, self.optimizer, self.scheduler, mbs, self._forward, loss_fn)
        metrics = {**self.evaluate(student_scores, teacher_scores, pair),
                   "critic/d_grad_norm": step["grad_norm"], "critic/d_update_ok": step["update_ok"]}
        return broadcast_metrics(metrics)

def build_discriminator(cfg, horizon_steps: int) -> Discriminator:
    """Trunk from `gad.discriminator_path` (default model.path) + scalar head, same layout as
    the actor; its optimizer from `gad.d_*` (the actor's distributed-optimizer setting)."""
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.trainer.build import build_trained

    g = cfg.gad
    optim = OptimConfig(lr=g.d_lr, weight_decay=g.d_weight_decay, clip_grad=g.d_clip_grad,
                        distributed_optimizer=cfg.actor.optim.distributed_optimizer)
    t = build_trained(cfg, g.discriminator_path or cfg.model.path, optim, horizon_steps, value_head=True)
    return Discriminator(t.ddp[0], t.optimizer, t.scheduler, g.d_micro_batch_size)
