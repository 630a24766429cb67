"""The weight-sync interface: a transport moves buckets from the trainer to an engine.

    transport = build_transport("colocated", deliver=...)      # or native / broadcast
    metrics = sync_weights(iter_hf_weights(actor), transport, bucket_mb=256)

`sync_weights` plans nothing per call beyond the bucketing: the stream is the actor's
full (TP=1, all stages) HF-named tensors, gathered one parameter at a time
(`models/loading.py::iter_hf_weights`), so resharding *into* the engine's TP layout is
the engine's own loader's job (vLLM's `load_weights`, or `rollout/weight_loader.py`).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Protocol

import torch

from megatron_rl.rollout.weight_sync.bucketing import Bucket, iter_buckets

TRANSPORTS: dict[str, Callable[..., "WeightTransport"]] = {}


def register_transport(name: str):
    def deco(cls):
        cls.name = name
        TRANSPORTS[name] = cls
        return cls
    return deco


def build_transport(name: str, **kwargs) -> "WeightTransport":
    if name not in TRANSPORTS:
        raise ValueError(f"weight sync transport {name!r} unknown; expected one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](**kwargs)


class WeightTransport(Protocol):
    """`begin()`, `send(bucket)` per bucket, `end()`; every call blocks until the
    receiver is done with the bucket, so the sender may reuse its buffer."""

    def begin(self) -> None: ...

    def send(self, bucket: Bucket) -> None: ...

    def end(self) -> None: ...


def sync_weights(named: Iterable[tuple[str, torch.Tensor]], transport: WeightTransport, *,
                 bucket_mb: float = 256, device=None, dtype: torch.dtype | None = None,
                 is_sender: bool = True) -> dict[str, float]:
    """Stream `named` through `transport`; returns `weight_sync/{bytes,seconds,gbps,buckets,tensors}`.

    Ranks with `is_sender=False` still drain `named` (it may hold collectives: TP gather,
    PP broadcast) but send nothing.
    """
    t0 = time.perf_counter()
    nbytes = buckets = tensors = 0
    if not is_sender:
        for _ in named:
            pass
        return {}
    transport.begin()
    for bucket in iter_buckets(named, int(bucket_mb * 2 ** 20), device=device, dtype=dtype):
        if bucket.buffer.is_cuda:
            torch.cuda.current_stream(bucket.buffer.device).synchronize()   # receivers may read on another stream
        transport.send(bucket)
        buckets += 1
        tensors += sum(1 for p in bucket.pieces if p.start + p.nbytes == p.total)
        nbytes += sum(p.nbytes for p in bucket.pieces)
    transport.end()
    dt = time.perf_counter() - t0
    return {"weight_sync/bytes": float(nbytes), "weight_sync/seconds": dt,
            "weight_sync/gbps": nbytes / max(dt, 1e-9) / 1e9, "weight_sync/buckets": float(buckets),
            "weight_sync/tensors": float(tensors)}
