"""Sharing results of the last pipeline stage with every rank, and the TP group handle
the loss kernels take. Loss values and log-probs exist only on the last stage; every
rank's trainer loop needs them."""
from __future__ import annotations

import torch
import torch.distributed as dist


def tp_group():
    """Megatron's tensor-parallel group, or None without TP (the kernels' convention)."""
    from megatron.core import parallel_state as mpu
    return mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 else None


def broadcast_from_last_stage(t: torch.Tensor | None, shape, dtype=torch.float32) -> torch.Tensor:
    """`t` (given on the last stage, None elsewhere) on every pipeline rank, on the CPU."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return t
    group = mpu.get_pipeline_model_parallel_group()
    dev = "cuda" if torch.cuda.is_available() else "cpu"     # NCCL moves device tensors only
    # Sender and receivers must agree on the dtype: NCCL does not check sizes (a mismatch hangs).
    t = torch.empty(shape, dtype=dtype, device=dev) if t is None else t.to(dev, dtype).contiguous()
    dist.broadcast(t, src=dist.get_process_group_ranks(group)[-1], group=group)
    return t.cpu()


def broadcast_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Loss metrics exist on the last pipeline stage only; share them with every rank."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    obj = [metrics]
    group = mpu.get_pipeline_model_parallel_group()
    dist.broadcast_object_list(obj, src=dist.get_process_group_ranks(group)[-1], group=group)
    return obj[0]
