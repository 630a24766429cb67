"""Distributed start-up: torch.distributed plus Megatron's parallel_state.

`init_distributed(tp, pp, ep=..., etp=...)` works the same under torchrun (env:// rendezvous),
in multi-process tests (explicit rank/world_size/init_method) and in a plain
single process (world of one, a free local port). NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rl.parallel.cpu_compat import install_cpu_shims


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, *, vpp: int | None = None, cp: int = 1,
                     ep: int = 1, etp: int | None = None, rank: int | None = None, world_size: int | None = None,
                     init_method: str | None = None, backend: str | None = None,
                     seed: int = 1234, timeout_s: int = 600) -> None:
    """Initialise torch.distributed and Megatron's model-parallel groups (idempotent).

    The data-parallel size is world_size / (tp * pp * cp); the CP ranks of a DP rank share its
    rows and Megatron's DDP reduces gradients over DP x CP (parallel/context_parallel.py). Mixture-of-experts layers
    use Megatron's second grid: experts split over `ep` expert-parallel ranks (carved out
    of data parallelism) and each expert over `etp` ranks (default: tp); expert weights
    are reduced over the remaining expert-data-parallel group. Installs the CPU shims
    when CUDA is absent and seeds Megatron's model-parallel RNG.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    on_gpu = torch.cuda.is_available()
    install_cpu_shims()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if init_method is None:
            if "MASTER_ADDR" in os.environ:
                init_method = "env://"
            else:
                init_method = f"tcp://127.0.0.1:{_free_port()}"
        backend = backend or ("nccl" if on_gpu else "gloo")
        if on_gpu:
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    etp = tp if etp is None else etp
    if ep < 1 or etp < 1:
        raise ValueError(f"model.ep={ep} and model.etp={etp} must be >= 1")
    if world % (etp * ep * pp):
        raise ValueError(f"world size {world} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} "
                         "(model.etp * model.ep * model.pp)")
    if mpu.model_parallel_is_initialized():
        have = (mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size(),
                mpu.get_expert_model_parallel_world_size(), mpu.get_expert_tensor_parallel_world_size(),
                mpu.get_context_parallel_world_size())
        if have != (tp, pp, ep, etp, cp):
            raise RuntimeError(f"model parallel already initialised with (tp, pp, ep, etp, cp) = {have}, not "
                               f"{(tp, pp, ep, etp, cp)}; call destroy_distributed() first")
        return
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  virtual_pipeline_model_parallel_size=vpp,
                                  context_parallel_size=cp, expert_model_parallel_size=ep,
                                  expert_tensor_parallel_size=etp)
    if on_gpu:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    from megatron.core import parallel_state as mpu
    return mpu.get_tensor_model_parallel_rank()


def ep_rank() -> int:
    from megatron.core import parallel_state as mpu
    return mpu.get_expert_model_parallel_rank()


def ep_size() -> int:
    from megatron.core import parallel_state as mpu
    return mpu.get_expert_model_parallel_world_size()


def tp_size() -> int:
    from megatron.core import parallel_state as mpu
    return mpu.get_tensor_model_parallel_world_size()


def pp_rank() -> int:
    from megatron.core import parallel_state as mpu
    return mpu.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    from megatron.core import parallel_state as mpu
    return mpu.get_pipeline_model_parallel_world_size()


def is_pp_first() -> bool:
    from megatron.core import parallel_state as mpu
    return mpu.is_pipeline_first_stage(ignore_virtual=True)


def is_pp_last() -> bool:
    from megatron.core import parallel_state as mpu
    return mpu.is_pipeline_last_stage(ignore_virtual=True)
