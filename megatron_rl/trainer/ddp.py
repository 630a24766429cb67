"""Megatron DDP over this rank's model chunks, as Megatron-LM's `training.py` wraps them.

One `DistributedDataParallel` per chunk (one per virtual pipeline stage under
`model.vpp`, else one); only the first chunk's grad buffer is bucketed (Megatron-LM's
`disable_bucketing=(model_chunk_idx > 0)`). The chunks share one TransformerConfig, on
which `finalize_model_grads` is set: the schedule calls it once with the whole list
(DP all-reduce per chunk, tied-embedding all-reduce between the first chunk of the first
stage and the last chunk of the last). Hand the list to
`megatron.core.optimizer.get_megatron_optimizer(cfg, ddp_chunks)`.
"""
from __future__ import annotations


def wrap_ddp_chunks(chunks, use_dist_opt: bool) -> list:
    """`chunks`: one GPTModel or this rank's list of them; returns the list of DDP wrappers."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_dist_opt)
    wrapped = [DistributedDataParallel(config=c.config, module=c, ddp_config=ddp_config, disable_bucketing=i > 0)
               for i, c in enumerate(chunks)]
    for c in chunks:
        c.config.finalize_model_grads_func = finalize_model_grads
    return wrapped

