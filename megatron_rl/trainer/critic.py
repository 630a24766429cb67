"""The PPO critic: a GPTModel trunk + scalar head (`models.value_head`) that predicts
V(prefix) per response token, so GAE (`algos.adv_estimator: gae`) has `values`.

The value of response token t is read at the position whose hidden state predicts
t (P-1+t, the positions `microbatch.response_logits` reads), i.e. V of the prefix
before t. Values are zero outside `response_mask`. Both the forward (`compute_values`)
and the update run through Megatron's schedule, so TP/PP work as for the actor.
The update minimises the PPO clipped value loss (`algos.value_loss`) towards the
returns of the advantage phase, clipped around the values it was given (`batch["values"]`).
"""
from __future__ import annotations

import torch

from megatron_rl.algos.value_loss import value_loss
from megatron_rl.data.batch import Batch
from megatron_rl.models.schedule import run_microbatches
from megatron_rl.models.value_head import attach_value_head
from megatron_rl.parallel.pipeline import broadcast_from_last_stage, broadcast_metrics
from megatron_rl.trainer.update_steps import minibatch_passes, optimizer_step, set_loss_scales, weighted_mean
from megatron_rl.trainer.value_model import ValueModel


def response_values(values: torch.Tensor, mb: dict) -> torch.Tensor:
    """[b, R] values that go with the response tokens, from per-position values [b, P+R]."""
    p = int(mb["prompt_len"])
    r = mb["labels"].shape[1]
    return values[:, p - 1: p - 1 + r]


def clip_range(critic_cfg) -> float | None:
    """`critic.cliprange_value`; null or <= 0 turns clipping off (a zero range would freeze V)."""
    c = getattr(critic_cfg, "cliprange_value", None)
    return None if c is None or c <= 0 else float(c)


class Critic(ValueModel):
    """Built by `build_critic`; the shared trunk + head plumbing is in `value_model.py`."""

    @torch.no_grad()
    def compute_values(self, batch: Batch) -> torch.Tensor:
        """[B, R] float32 values of the response tokens, zero outside `response_mask`, on every rank."""
        was_training = self.model.training
        self.model.eval()
        res = run_microbatches([self.ddp], self._microbatches(batch), self._forward,
                               lambda mb, out: (out.sum() * 0, {"v": response_values(out, mb).float().cpu()}),
                               forward_only=True)
        self.model.train(was_training)
        n, r = len(batch), batch["response_ids"].shape[1]
        v = torch.cat([x["v"] for x in res])[:n] if res else None
        v = broadcast_from_last_stage(v, (n, r))
        return v * (batch["response_mask"] > 0).float()

    def update(self, batch: Batch, algos_cfg, critic_cfg, *, mini_batch_size: int = 0,
               seed: int = 0) -> dict[str, float]:
        """`critic_cfg.ppo_epochs` passes over shuffled mini-batches of `batch` (which needs
        `values`, the critic's own values before the update, and `returns`); returns the
        `critic/*` metrics averaged over the optimizer steps. Mini-batches hold
        `critic_cfg.mini_batch_size` rows; `mini_batch_size` (the actor's) is used where that
        is -1, so a caller passes the actor's and the critic's own setting wins."""
        for key in ("values", "returns"):
            if key not in batch:
                raise KeyError(f"critic update: batch has no '{key}' (run compute_values and the advantage "
                               f"phase first; batch keys: {sorted(batch.tensors)})")
        self.model.train()
        clip = clip_range(critic_cfg)
        own = getattr(critic_cfg, "mini_batch_size", -1)
        mini_batch_size = mini_batch_size if own < 0 else own
        steps = minibatch_passes(batch, mini_batch_size, max(1, critic_cfg.ppo_epochs), seed,
                                 lambda mini: self._optimizer_step(mini, algos_cfg, clip))
        return {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}

    def _optimizer_step(self, mini: Batch, algos_cfg, clip: float | None) -> dict[str, float]:
        mbs = self._microbatches(mini)
        # token weights shape the policy loss only; the value target is the same for every token
        set_loss_scales(mbs, algos_cfg.loss_agg_mode, "pg")

        def loss_fn(mb, out):
            v = response_values(out, mb)
            mask = mb["response_mask"]
            loss, clipfrac = value_loss(v, mb["values"], mb["returns"], mask, clip,
                                        agg_mode=algos_cfg.loss_agg_mode, norm_len=algos_cfg.norm_len)
            valid = (mask > 0).float()
            info = {"critic/vf_loss": float(loss.detach()), "critic/vf_clipfrac": float(clipfrac),
                    "critic/values_mean": float((v.detach() * valid).sum() / valid.sum().clamp(min=1)),
                    "_w": float(mb["loss_scale"]) / len(mbs)}
            return loss * mb["loss_scale"], info

        res, step = optimizer_step(self.ddp, self.optimizer, self.scheduler, mbs, self._forward, loss_fn)
        return {**broadcast_metrics(weighted_mean(res)), **{f"critic/{k}": v for k, v in step.items()}}

def build_critic(cfg, horizon_steps: int) -> Critic:
    """Trunk from `critic.path` (default model.path) + value head, same layout and dtype as
    the actor, optimizer `critic.optim` over `horizon_steps` optimizer steps, micro-batches
    of `critic.micro_batch_size` (0: the actor's)."""
    from megatron_rl.trainer.build import build_trained

    c = cfg.critic
    t = build_trained(cfg, c.path or cfg.model.path, c.optim, horizon_steps, value_head=True)
    return Critic(t.ddp[0], t.optimizer, t.scheduler, c.micro_batch_size or cfg.actor.micro_batch_size)
