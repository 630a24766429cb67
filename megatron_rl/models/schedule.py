"""Running micro-batches through Megatron's own forward/backward schedules.

`run_microbatches` wraps `megatron.core.pipeline_parallel.get_forward_backward_func`
so the same code path serves TP-only and pipelined models, forward-only (log-prob
computation) and training. Under PP every micro-batch must have the same
`[micro_batch, seq]` shape (the schedule's p2p buffers are fixed-size); without PP
shapes may differ (packed token-budget micro-batches: Megatron's no-pipelining
schedule ignores `seq_length`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


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

    shapes = {tuple(mb["input_ids"].shape) for mb in microbatches}
    if len(shapes) != 1 and mpu.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError(f"all micro-batches need one [batch, seq] shape under the pipeline schedule, got {shapes}")
    mbs, seq = max(shapes)
    it = iter(microbatches)
    results: list[dict] = []

    def step(data_iterator, model_chunk):
        mb = next(data_iterator)
        out = forward_fn(model_chunk, mb)

        def reduce(output_tensor):
            loss, info = loss_fn(mb, output_tensor)
            results.append(info)
            return loss, {"_": loss.detach()}
        return out, reduce

    fb = get_forward_backward_func()
    fb(forward_step_func=step, data_iterator=it, model=model, num_microbatches=len(microbatches),
       seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)
    return results
