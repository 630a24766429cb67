"""Colocated transport: the engine's workers share the trainer's GPU(s).

Each bucket is handed to `deliver(payload)`, which runs `receive_bucket` on every
engine worker (vLLM: `llm.collective_rpc`). In the same process (vLLM's uniproc
executor, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, TP=1) the payload is the bucket itself;
for workers in other processes (vLLM TP > 1) it carries a CUDA IPC handle of the
bucket buffer (`torch.multiprocessing.reductions.reduce_tensor`), rebuilt on the
worker as a view of the sender's memory. Either way no second copy of the model is
made: one bucket buffer on the sender, the engine's own parameters on the receiver.
Each worker loads the full HF tensors and its loader keeps its own TP shard.

Receiver state (split tensors in flight) lives on the worker, keyed by `key`.
"""
from __future__ import annotations

from typing import Callable

from megatron_rl.rollout.weight_sync.base import register_transport
from megatron_rl.rollout.weight_sync.bucketing import Bucket, BucketReceiver, Piece

_RECEIVERS: dict[str, BucketReceiver] = {}


def pack_payload(bucket: Bucket, ipc: bool):
    """What crosses to the worker: the bucket, or (IPC rebuild fn, args, pieces)."""
    if not ipc:
        return ("local", bucket)
    from torch.multiprocessing.reductions import reduce_tensor

    fn, args = reduce_tensor(bucket.buffer)
    return ("ipc", (fn, args, [_piece_tuple(p) for p in bucket.pieces]))


def unpack_payload(payload) -> Bucket:
    kind, body = payload
    if kind == "local":
        return body
    fn, args, pieces = body
    return Bucket(fn(*args), [Piece(*p) for p in pieces])


def _piece_tuple(p: Piece):
    return (p.name, p.shape, p.dtype, p.offset, p.nbytes, p.start, p.total)


def receive_bucket(payload, sink: Callable, key: str = "default") -> int:
    """Worker side: add one bucket; `sink(list of (name, tensor))` loads the completed
    tensors (e.g. `model.load_weights`). A payload of None ends the sync."""
    if payload is None:
        rx = _RECEIVERS.pop(key, None)
        if rx is not None:
            rx.finish()
            return rx.bytes
        return 0
    rx = _RECEIVERS.get(key)
    if rx is None:
        rx = _RECEIVERS[key] = BucketReceiver(sink)
    rx.sink = sink
    rx.add(unpack_payload(payload))
    return rx.bytes


@register_transport("colocated")
class ColocatedTransport:
    """`deliver(payload)` must run `receive_bucket(payload, sink)` on every worker and
    return once they are done; `ipc=True` when workers live in other processes."""

    def __init__(self, deliver: Callable[[object], object], ipc: bool = False):
        self.deliver, self.ipc = deliver, ipc

    def begin(self) -> None:
        pass

    def send(self, bucket: Bucket) -> None:
        self.deliver(pack_payload(bucket, self.ipc))

    def end(self) -> None:
        self.deliver(None)
