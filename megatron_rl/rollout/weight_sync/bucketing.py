"""Packing a stream of named tensors into fixed-size byte buckets, and back.

A bucket is one flat `uint8` buffer plus the `Piece`s it holds. A tensor larger than
the bucket is split into byte ranges over consecutive buckets (the embedding of a
large vocabulary is the usual case) and reassembled by `BucketReceiver`; it is never
refused. Pieces start at `ALIGN`-byte offsets so an unsplit piece is a zero-copy,
correctly aligned view of the bucket (`buffer[a:b].view(dtype).view(shape)`).

Lifecycle: the sender fills one buffer per bucket (reused when `reuse_buffer`), a
transport hands the bucket over (in process, CUDA IPC, or broadcast), the receiver
turns it into (name, tensor) pairs for a sink such as `model.load_weights`. The
buffer may be overwritten by the next bucket: a sink that keeps tensors past its call
must ask the receiver for copies (`copy=True`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

ALIGN = 256   # bytes; CUDA allocations are 256-aligned, and every dtype divides it


@dataclass(frozen=True)
class Piece:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int        # byte offset inside the bucket buffer
    nbytes: int        # bytes of this piece
    start: int         # byte offset of this piece inside the full tensor
    total: int         # bytes of the full tensor

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.nbytes == self.total


@dataclass
class Bucket:
    buffer: torch.Tensor           # uint8 [>= used]
    pieces: list[Piece]

    @property
    def used(self) -> int:
        return max((p.offset + p.nbytes for p in self.pieces), default=0)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (no copy when already contiguous)."""
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *, device=None,
                 dtype: torch.dtype | None = None, reuse_buffer: bool = True) -> Iterator[Bucket]:
    """Pack `named` into buckets of at most `bucket_bytes` (>= ALIGN).

    `dtype` casts floating tensors (e.g. fp32 master weights -> the engine's bf16);
    `device` is where the buffers live (default: each tensor's own device).
    """
    if bucket_bytes < ALIGN:
        raise ValueError(f"weight sync bucket size {bucket_bytes} B is below the {ALIGN} B alignment")
    buf: torch.Tensor | None = None
    pieces: list[Piece] = []
    fill = 0

    def new_buffer(dev):
        nonlocal buf
        if buf is None or not reuse_buffer or buf.device != torch.device(dev):
            buf = torch.empty(bucket_bytes, dtype=torch.uint8, device=dev)
        return buf

    for name, t in named:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        dev = device if device is not None else t.device
        raw = as_bytes(t.to(dev))
        total, start = raw.numel(), 0
        while True:
            if buf is None:
                new_buffer(dev)
            room = bucket_bytes - fill
            take = min(room, total - start)
            if take <= 0 and total > 0:
                yield Bucket(buf, pieces)
                pieces, fill = [], 0
                new_buffer(dev)
                continue
            buf[fill:fill + take].copy_(raw[start:start + take])
            pieces.append(Piece(name, tuple(t.shape), t.dtype, fill, take, start, total))
            fill = min(_align(fill + take), bucket_bytes)
            start += take
            if start >= total:
                break
    if pieces:
        yield Bucket(buf, pieces)


class BucketReceiver:
    """Turns buckets back into full (name, tensor) pairs and passes each bucket's
    completed tensors to `sink` in one call (one `load_weights` per bucket).

    Split tensors are reassembled in a private buffer; unsplit ones are views of the
    bucket unless `copy=True`. `finish()` raises if a split tensor never completed.
    """

    def __init__(self, sink: Callable[[list[tuple[str, torch.Tensor]]], None], *, copy: bool = False):
        self.sink, self.copy = sink, copy
        self._partial: dict[str, tuple[torch.Tensor, int]] = {}   # name -> (uint8 buffer, bytes received)
        self.tensors = 0
        self.bytes = 0

    def add(self, bucket: Bucket) -> None:
        done: list[tuple[str, torch.Tensor]] = []
        for p in bucket.pieces:
            src = bucket.buffer[p.offset:p.offset + p.nbytes]
            if p.whole:
                raw = src.clone() if self.copy else src
            else:
                full, got = self._partial.get(p.name, (None, 0))
                if full is None:
                    full = torch.empty(p.total, dtype=torch.uint8, device=src.device)
                full[p.start:p.start + p.nbytes].copy_(src)
                got += p.nbytes
                if got < p.total:
                    self._partial[p.name] = (full, got)
                    continue
                self._partial.pop(p.name, None)
                raw = full
            done.append((p.name, _from_bytes(raw, p)))
            self.tensors += 1
            self.bytes += p.total
        if done:
            self.sink(done)

    def finish(self) -> None:
        if self._partial:
            missing = {n: f"{got}/{buf.numel()} B" for n, (buf, got) in self._partial.items()}
            raise RuntimeError(f"weight sync ended with incomplete tensors: {missing}")


def _from_bytes(raw: torch.Tensor, p: Piece) -> torch.Tensor:
    if p.total == 0:
        return torch.empty(p.shape, dtype=p.dtype, device=raw.device)
    return raw.view(p.dtype).view(p.shape)
