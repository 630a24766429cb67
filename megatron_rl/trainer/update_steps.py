"""Optimizer-step plumbing shared by every trained role (policy, critic, discriminator):
shuffled mini-batch passes, micro-batch loss shares, and one Megatron step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.models.schedule import run_microbatches
from megatron_rl.parallel.data_parallel import dp_mean
from megatron_rl.trainer.faults import fault_point, nan_loss_now


def minibatch_passes(batch: Batch, mini_batch_size: int, epochs: int, seed: int,
                     step: Callable[[Batch], dict]) -> list[dict]:
    """`epochs` passes over shuffled mini-batches (whole batch when `mini_batch_size` is 0);
    one `step(mini)` result per optimizer step."""
    n = len(batch)
    mini = mini_batch_size or n
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen) if mini < n else torch.arange(n)
        for start in range(0, n, mini):
            out.append(step(batch.select(perm[start:start + mini])))
    return out


def microbatch_weights(mbs: list[dict], agg_mode: str, token_weights_apply_to: str = "pg") -> list[float]:
    """Each micro-batch's share of the mini-batch loss, so that summing the scaled
    micro-batch losses (over micro-batches, then DDP's mean over DP ranks) equals the loss of
    the whole global mini-batch. With token weights applied to the mask, the token-mean
    denominator is the sum of weights, so shares follow it."""
    if agg_mode == "token-mean":
        weighted = token_weights_apply_to == "mask"
        counts = [float((mb["response_mask"] * mb["token_weights"]).sum()) if weighted and "token_weights" in mb
                  else float(mb["response_mask"].sum()) for mb in mbs]
    else:
        counts = [float((mb["response_mask"].sum(-1) > 0).sum()) for mb in mbs]
    # DDP averages the ranks' gradients: dividing by the DP-mean count (not this rank's) makes the
    # update the global batch's token-mean loss even when ranks hold different numbers of tokens
    total = dp_mean([sum(counts)])
    return [c / total if total > 0 else 0.0 for c in counts]


def set_loss_scales(mbs: list[dict], agg_mode: str, token_weights_apply_to: str = "pg") -> None:
    """`mb["loss_scale"]` = share x number of micro-batches: Megatron's schedule divides each
    micro-batch loss by that number, and the shares already sum to 1."""
    for mb, w in zip(mbs, microbatch_weights(mbs, agg_mode, token_weights_apply_to)):
        mb["loss_scale"] = torch.tensor(w * len(mbs), device=mb["input_ids"].device)


def weighted_mean(res: list[dict]) -> dict[str, float]:
    """Micro-batch metrics averaged with their `_w` shares (NaNs skipped)."""
    if not res:
        return {}
    total = sum(r["_w"] for r in res) or 1.0
    keys = [k for k in res[0] if k != "_w"]
    return {k: sum(r[k] * r["_w"] for r in res if not math.isnan(r[k])) / total for k in keys}


def optimizer_step(ddp, optimizer, scheduler, mbs: list[dict], forward_fn, loss_fn,
                   before_step: Callable[[], None] | None = None) -> tuple[list[dict], dict]:
    """Zero grads, forward/backward every micro-batch through the schedule, step optimizer and
    scheduler. Returns (per-micro-batch loss infos, {grad_norm, update_ok, skipped, lr}). `ddp`:
    one DDP wrapper or the list of a chunked (`model.vpp`) model's. `before_step` runs right
    before `optimizer.step()` (Policy: wait for the optimizer state's overlapped onload).

    Step guard: a non-finite loss or gradient on any rank skips the step on every rank, so
    weights, optimizer state and LR schedule stay untouched (Megatron checks only fp16 runs with
    a grad scaler; in bf16 / fp32 it would clip by a NaN norm and poison Adam's moments). The
    scheduler steps only after a successful update, as in Megatron-LM's training loop."""
    chunks = list(ddp) if isinstance(ddp, (list, tuple)) else [ddp]
    for d in chunks:
        d.zero_grad_buffer()
    optimizer.zero_grad()
    poison = nan_loss_now()
    loss_bad: list[torch.Tensor] = []

    def guarded_loss(mb, output):
        loss, info = loss_fn(mb, output)
        if poison:
            loss = loss * float("nan")
        loss_bad.append(~torch.isfinite(loss.detach()).all())
        return loss, info

    res = run_microbatches(chunks, mbs, forward_fn, guarded_loss, forward_only=False)
    fault_point("update")
    if not step_is_finite(chunks, loss_bad):
        _back_off_loss_scale(optimizer)
        for d in chunks:
            d.zero_grad_buffer()
        optimizer.zero_grad()
        return res, {"grad_norm": float("nan"), "update_ok": 0.0, "skipped": 1.0,
                     "lr": optimizer.param_groups[0]["lr"]}
    if before_step is not None:
        before_step()
    ok, grad_norm, _ = optimizer.step()
    if ok and scheduler is not None:
        scheduler.step(increment=1)
    return res, {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                 "update_ok": float(bool(ok)), "skipped": float(not ok), "lr": optimizer.param_groups[0]["lr"]}


def step_is_finite(chunks: list, loss_bad: list[torch.Tensor]) -> bool:
    """True when every rank's losses and DDP-reduced gradients are finite (one all-reduce)."""
    params = [p for d in chunks for p in d.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for b in loss_bad:
        bad |= b.to(device)
    for p in params:
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            bad |= ~torch.isfinite(g).all()
    flag = bad.float().reshape(1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not bool(flag.item())


def _back_off_loss_scale(optimizer) -> None:
    """fp16: tell the grad scaler a step overflowed, as Megatron's own skip does."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        scaler = getattr(opt, "grad_scaler", None)
        if scaler is not None:
            scaler.update(True)


@dataclass
class BadStepGuard:
    """Counts optimizer steps skipped in a row (`trainer.max_bad_steps`) and stops the run past
    the limit. Fed each rollout step's metrics: `{prefix}/skipped_steps` of
    `{prefix}/optimizer_steps`; a rollout step with any successful update resets the count."""
    max_bad_steps: int
    in_a_row: int = 0

    def update(self, metrics: dict, step: int, prefix: str = "actor") -> None:
        skipped = int(metrics.get(f"{prefix}/skipped_steps", 0))
        total = int(metrics.get(f"{prefix}/optimizer_steps", skipped))
        self.in_a_row = self.in_a_row + skipped if skipped and skipped >= total else 0
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteStepsError(
                f"trainer.max_bad_steps={self.max_bad_steps}: {self.in_a_row} {prefix} optimizer steps in a row had "
                f"a non-finite loss or gradient (the last at rollout step {step}) and were skipped; stopping rather "
                f"than training on NaNs. Lower {prefix}.optim.lr, check rewards and advantages, or resume from an "
                f"earlier checkpoint (trainer.resume=PATH).")


class NonFiniteStepsError(RuntimeError):
    """Too many consecutive optimizer steps were skipped for non-finite values."""
