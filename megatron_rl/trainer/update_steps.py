"""Optimizer-step plumbing shared by every trained role (policy, critic, discriminator):
shuffled mini-batch passes, micro-batch loss shares, and one Megatron step."""
from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.models.schedule import run_microbatches


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
    total = dp_mean_total(sum(counts))
    return [c / total if total > 0 else 0.0 for c in counts]


def dp_mean_total(total: float) -> float:
    """The mean over DP ranks of each rank's token (or sequence) count. DDP averages the
    ranks' gradients, so dividing by this rather than the rank's own count makes the update
    the global batch's token-mean loss even when ranks hold different numbers of tokens."""
    from megatron_rl.parallel.data_parallel import dp_rank_size

    _, size = dp_rank_size()
    if size == 1:
        return total
    from megatron.core import parallel_state as mpu

    t = torch.tensor([total], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t, group=mpu.get_data_parallel_group())
    return float(t.item()) / size


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


def optimizer_step(ddp, optimizer, scheduler, mbs: list[dict], forward_fn, loss_fn) -> tuple[list[dict], dict]:
    """Zero grads, forward/backward every micro-batch through the schedule, step optimizer and
    scheduler. Returns (per-micro-batch loss infos, {grad_norm, update_ok, lr}). `ddp`: one
    DDP wrapper or the list of a chunked (`model.vpp`) model's."""
    chunks = list(ddp) if isinstance(ddp, (list, tuple)) else [ddp]
    for d in chunks:
        d.zero_grad_buffer()
    optimizer.zero_grad()
    res = run_microbatches(chunks, mbs, forward_fn, loss_fn, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if scheduler is not None:
        scheduler.step(increment=1)
    return res, {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                 "update_ok": float(bool(ok)), "lr": optimizer.param_groups[0]["lr"]}
