"""Broadcast transport for an engine on separate GPUs: the trainer's sender rank
broadcasts each bucket (its piece table, then the flat buffer) over a group that
contains the engine's workers; every worker runs `receive_broadcast` at the same time.

The group is reached through a small `comm` adapter with `broadcast_obj(obj, src)` and
`broadcast(tensor, src)`: `TorchDistComm` wraps a torch.distributed group (NCCL on GPU,
gloo on CPU, where the tests run it); `PyNcclComm` wraps vLLM's stateless
`StatelessProcessGroup` + `PyNcclCommunicator`, which can join trainer and vLLM
workers that never shared a torch.distributed world.
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_rl.rollout.weight_sync.base import register_transport
from megatron_rl.rollout.weight_sync.bucketing import Bucket


class TorchDistComm:
    def __init__(self, group=None):
        self.group = group

    def broadcast_obj(self, obj, src: int):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        import torch.distributed as dist

        dist.broadcast(tensor, src=src, group=self.group)


class PyNcclComm:
    """vLLM's stateless NCCL group (`vllm.distributed.utils.StatelessProcessGroup` and
    `vllm.distributed.device_communicators.pynccl.PyNcclCommunicator`): rank 0 is the
    trainer, ranks 1..N the vLLM workers."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.nccl = PyNcclCommunicator(self.pg, device=device)

    def broadcast_obj(self, obj, src: int):
        return self.pg.broadcast_obj(obj, src=src)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.nccl.broadcast(tensor, src=src, stream=torch.cuda.current_stream())


@register_transport("broadcast")
class BroadcastTransport:
    def __init__(self, comm, src: int = 0):
        self.comm, self.src = comm, src

    def begin(self) -> None:
        pass

    def send(self, bucket: Bucket) -> None:
        used = bucket.used
        self.comm.broadcast_obj({"pieces": bucket.pieces, "bytes": used}, self.src)
        self.comm.broadcast(bucket.buffer[:used], self.src)

    def end(self) -> None:
        self.comm.broadcast_obj(None, self.src)


def receive_broadcast(comm, on_bucket: Callable[[Bucket], None], *, src: int = 0, device=None) -> int:
    """Receiver loop (engine worker): pass each bucket to `on_bucket` (a `BucketReceiver.add`,
    or a `NativeTransport.send`) until the sender's end; returns the bytes received."""
    buf: torch.Tensor | None = None
    total = 0
    while True:
        meta = comm.broadcast_obj(None, src)
        if meta is None:
            return total
        n = meta["bytes"]
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.uint8, device=device)
        view = buf[:n]
        comm.broadcast(view, src)
        on_bucket(Bucket(view, meta["pieces"]))
        total += n
