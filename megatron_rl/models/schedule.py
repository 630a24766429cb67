"""Running micro-batches through Megatron's own forward/backward schedules.

`run_microbatches` wraps `megatron.core.pipeline_parallel.get_forward_backward_func`
so the same code path serves TP-only and pipelined models, forward-only (log-prob
computation) and training. Under PP every micro-batch must have the same
`[micro_batch, seq]` shape (the schedule's p2p buffers are fixed-size); without PP
shapes may differ (packed token-budget micro-batches: Megatron's no-pipelining
schedule ignores `seq_length`).

`model` is one model or this rank's list of chunks (one per virtual pipeline stage
under `model.vpp`, where Megatron picks its interleaved 1F1B schedule). Every chunk
reads every micro-batch (masks, positions, labels) through its own iterator.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from megatron_rl.parallel.cpu_compat import reset_moe_aux_loss_scale


def run_microbatches(model, microbatches: list[dict[str, torch.Tensor]],
                     forward_fn: Callable[[Any, dict], torch.Tensor],
                     loss_fn: Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict]],
                     forward_only: bool) -> list[dict]:
    """Run every micro-batch; returns, on the last pipeline stage, one dict per micro-batch.

    forward_fn(model, mb) -> output tensor of the stage (logits on the last stage);
    loss_fn(mb, logits) -> (scalar loss to backpropagate, dict of results). The
    loss is divided by nothing here: scale it inside `loss_fn` (e.g. by 1/num_microbatches).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    from megatron.core import parallel_state as mpu

    model = list(model) if isinstance(model, (list, tuple)) else [model]
    pp = mpu.get_pipeline_model_parallel_world_size()
    shapes = {tuple(mb["input_ids"].shape) for mb in microbatches}
    if len(shapes) != 1 and pp > 1:
        raise ValueError(f"all micro-batches need one [batch, seq] shape under the pipeline schedule, got {shapes}")
    check_interleaved_microbatches(len(microbatches), len(model), pp)
    mbs, seq = max(shapes)
    cp = mpu.get_context_parallel_world_size()
    if cp > 1:      # the CP forward pads s to a multiple of 2*cp; Megatron's p2p shapes take seq / cp
        seq = -(-seq // (2 * cp)) * 2 * cp
    it = iter(microbatches) if len(model) == 1 else [iter(microbatches) for _ in model]
    results: list[dict] = []

    def step(data_iterator, model_chunk):
        mb = next(data_iterator)
        out = forward_fn(model_chunk, mb)

        def reduce(output_tensor):
            loss, info = loss_fn(mb, output_tensor)
            results.append(info)
            return loss, {"_": loss.detach()}
        return out, reduce

    reset_moe_aux_loss_scale()      # Megatron keeps it across runs (parallel/cpu_compat.py says why)
    fb = get_forward_backward_func()
    fb(forward_step_func=step, data_iterator=it, model=model, num_microbatches=len(microbatches),
       seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)
    return results


def check_interleaved_microbatches(num_microbatches: int, num_chunks: int, pp: int) -> None:
    """Megatron-Core 0.16.1's interleaved schedule runs micro-batches in groups of
    `microbatch_group_size_per_vp_stage` (= PP): their count must be a multiple of PP."""
    if num_chunks > 1 and num_microbatches % pp:
        raise ValueError(
            f"model.vpp={num_chunks}: Megatron's interleaved pipeline schedule needs the number of "
            f"micro-batches ({num_microbatches}) to be a multiple of model.pp={pp}; choose "
            f"actor.micro_batch_size (and the per-DP-rank batch / actor.mini_batch_size) so that "
            f"batch / micro_batch_size is a multiple of {pp} (packed micro-batches, "
            f"actor.max_tokens_per_microbatch > 0, give a varying count: use 0 with model.vpp)")
