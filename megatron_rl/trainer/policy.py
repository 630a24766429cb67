"""A trainable (or frozen) Megatron policy: log-prob computation and PPO/GSPO updates
through Megatron's schedules, DDP wrapper and optimizer."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.data.batch import Batch
from megatron_rl.kernels import token_logprob_entropy, token_weighted_ppo_loss
from megatron_rl.models.forward import gpt_forward
from megatron_rl.models.schedule import run_microbatches
from megatron_rl.trainer.microbatch import make_microbatches, response_logits
from megatron_rl.trainer.update_steps import minibatch_passes, optimizer_step, set_loss_scales, weighted_mean


def _tp_group():
    from megatron.core import parallel_state as mpu
    return mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 else None


def _broadcast_from_last_stage(t: torch.Tensor | None, shape, dtype=torch.float32) -> torch.Tensor:
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return t
    group = mpu.get_pipeline_model_parallel_group()
    dev = "cuda" if torch.cuda.is_available() else "cpu"     # NCCL moves device tensors only
    # Sender and receivers must agree on the dtype: NCCL does not check sizes (a mismatch hangs).
    t = torch.empty(shape, dtype=dtype, device=dev) if t is None else t.to(dev, dtype).contiguous()
    dist.broadcast(t, src=dist.get_process_group_ranks(group)[-1], group=group)
    return t.cpu()


class Policy:
    """`model` is the GPTModel chunk; `optimizer`/`scheduler` None for frozen roles."""

    def __init__(self, model, *, micro_batch_size: int, temperature: float = 1.0, optimizer=None,
                 scheduler=None, ddp_model=None, fused_backend: str | None = None):
        self.model = model
        self.ddp = ddp_model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.mbs = micro_batch_size
        self.temperature = temperature
        self.vocab_size = model.arch.vocab_size
        self.backend = fused_backend
        self.steering = None      # a SteeringController attached to this model, or None

    def _forward(self, m, mb):
        """The model forward; under the same per-sample SAE steering as the rollout, so
        recomputed log-probs and the update see the behaviour policy (DESIGN.md)."""
        if self.steering is None:
            return gpt_forward(m, mb["input_ids"], mb["attention_mask"])
        from megatron_rl.steering.controller import generated_positions

        b, s = mb["input_ids"].shape
        p = int(mb["prompt_len"])
        with self.steering.use(mb.get("steer_strengths"), generated_positions(p, s - p, b, mb["input_ids"].device)):
            return gpt_forward(m, mb["input_ids"], mb["attention_mask"])

    def _forward_model(self):
        return self.ddp if self.ddp is not None else self.model

    def _microbatches(self, batch: Batch) -> list[dict]:
        device = next(self.model.parameters()).device
        return [{k: v.to(device) for k, v in mb.items()} for mb in make_microbatches(batch, self.mbs)]

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs [B, R] (and entropy) of the response tokens, on every rank."""
        was_training = self.model.training
        self.model.eval()
        mbs = self._microbatches(batch)

        def loss_fn(mb, output):
            logits = response_logits(output, mb, self.vocab_size)
            lp, ent = token_logprob_entropy(logits, mb["labels"], tp_group=_tp_group(),
                                            temperature=self.temperature, backend=self.backend)
            return output.sum() * 0, {"logprob": lp.float().cpu(), "entropy": ent.float().cpu()}

        res = run_microbatches([self._forward_model()], mbs, self._forward, loss_fn, forward_only=True)
        self.model.train(was_training)
        n, r = len(batch), batch["response_ids"].shape[1]
        lp = torch.cat([x["logprob"] for x in res])[:n] if res else None
        ent = torch.cat([x["entropy"] for x in res])[:n] if res else None
        lp = _broadcast_from_last_stage(lp, (n, r))
        ent = _broadcast_from_last_stage(ent, (n, r)) if with_entropy else None
        return lp * batch["response_mask"].float(), ent

    def update(self, batch: Batch, algos, *, mini_batch_size: int, ppo_epochs: int,
               use_ref: bool, seed: int) -> list[dict[str, float]]:
        """PPO/GSPO epochs over shuffled mini-batches; returns one metrics dict per optimizer step."""
        if self.optimizer is None:
            raise RuntimeError("update() on a frozen policy")
        self.model.train()
        return minibatch_passes(batch, mini_batch_size, ppo_epochs, seed,
                                lambda mini: self._optimizer_step(mini, algos, use_ref))

    def _optimizer_step(self, mini: Batch, algos, use_ref: bool) -> dict[str, float]:
        mbs = self._microbatches(mini)
        set_loss_scales(mbs, algos.loss_agg_mode, algos.token_weights_apply_to)
        kl_coef = algos.kl_loss_coef if (algos.use_kl_loss and use_ref) else 0.0

        def loss_fn(mb, output):
            logits = response_logits(output, mb, self.vocab_size)
            loss, metrics = token_weighted_ppo_loss(
                logits, mb["labels"], mb["old_logprob"], mb["advantages"], mb["response_mask"],
                token_weights=mb.get("token_weights"), ref_logprob=mb.get("ref_logprob") if kl_coef else None,
                clip_low=algos.clip_low, clip_high=algos.clip_high, clip_c=algos.clip_c,
                kl_kind=algos.kl_loss_kind, kl_coef=kl_coef, entropy_coef=algos.entropy_coef,
                loss_mode=algos.policy_loss, agg_mode=algos.loss_agg_mode,
                token_weights_apply_to=algos.token_weights_apply_to, tp_group=_tp_group(),
                temperature=self.temperature, norm_len=algos.norm_len, backend=self.backend)
            info = {k: float(v) for k, v in metrics.items()}
            info["_w"] = float(mb["loss_scale"]) / len(mbs)
            return loss * mb["loss_scale"], info

        res, step = optimizer_step(self.ddp, self.optimizer, self.scheduler, mbs, self._forward, loss_fn)
        return {**_broadcast_metrics(weighted_mean(res)), **step}


def _broadcast_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Loss metrics exist on the last pipeline stage only; share them with every rank."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    obj = [metrics]
    group = mpu.get_pipeline_model_parallel_group()
    dist.broadcast_object_list(obj, src=dist.get_process_group_ranks(group)[-1], group=group)
    return obj[0]
