"""Offload / onload of a role's GPU state: frozen weights (`ref.offload`) and a trainable
role's grads, optimizer state and weights (colocated rollout engines need the GPU while
they generate).

Mechanism: each tensor keeps its identity. The storages behind the tensors are copied to
(pinned) host buffers and resized to 0 bytes, which frees the device memory while every
view of them (tied embedding/output weights, Megatron DDP's param buffer views and
`main_grad`, the bucket views) stays the same object; the tensors themselves point at an
empty placeholder of the same dtype and device while offloaded, so a stray use raises a size
error instead of reading a freed pointer. `onload()` resizes the storages back, copies the
bytes (non_blocking from pinned memory, one stream sync at the end) and re-points the
tensors at their original views. Host buffers are kept for the next round trip (pinning is
slow). On a machine without CUDA the same code frees and restores the host storages, so it
is testable on CPU.

Overlapped onload (`onload(overlap=True)`, the actor's optimizer state after a rollout): only
`optimizer.step()` reads fp32 master params and Adam moments, so their host-to-device copies
run on a side CUDA stream while the update's forward/backward run on the current one;
`finish_onload()` makes the current stream wait on the copies' event and re-points the
tensors, and must run before anything reads them (Policy calls it right before the optimizer
step). Until then the tensors stay empty placeholders, so a read that forgot to wait raises a
size error instead of racing the copy. Without CUDA the copies are synchronous and the
re-pointing waits for `finish_onload()` the same way, so CPU tests catch a missing wait too.

Why not Megatron's `MegatronOptimizer.offload_to_cpu` (0.16.1): it replaces `p.data` with
an unpinned `.cpu()` copy and restores with `.cuda()`, which breaks the aliasing between
fp32 parameters the optimizer shares with the model (FP32Optimizer, fp32 shards that view
the DDP param buffer) and is a no-op without CUDA. Megatron's DDP grad-buffer offload
(`offload_grad_buffers` / `restore_grad_buffers`) is exactly what grads need (their values
are dead between optimizer steps; restored as zeros) and is used as is.

Offload only between optimizer steps: grads accumulated before an offload are dropped.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch


@dataclass(frozen=True)
class MoveStats:
    """What one offload/onload did: bytes copied device<->host, device bytes released (offload)
    or re-allocated (onload), wall time (synchronized)."""
    bytes_copied: int = 0
    bytes_freed: int = 0
    seconds: float = 0.0

    def __add__(self, other: "MoveStats") -> "MoveStats":
        return MoveStats(self.bytes_copied + other.bytes_copied, self.bytes_freed + other.bytes_freed,
                         self.seconds + other.seconds)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_copied / self.seconds / 1e9 if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class OverlapStats:
    """An overlapped onload on CUDA: `copy_s` the side-stream copy took, `wait_s` how long the
    current stream stalled at `finish_onload()` for it (the part on the critical path);
    `overlapped_s` the rest, hidden behind the update's forward/backward."""
    copy_s: float
    wait_s: float

    @property
    def overlapped_s(self) -> float:
        return max(self.copy_s - self.wait_s, 0.0)


@dataclass
class _PendingOnload:
    """Copies launched by `StorageOffloader.onload(overlap=True)`, not yet waited on: the
    tensors to re-point, and on CUDA the side stream's start/done events (timing enabled)."""
    records: list[tuple[torch.Tensor, torch.Tensor]]
    start: "torch.cuda.Event | None" = None
    done: "torch.cuda.Event | None" = None
    ready: "torch.cuda.Event | None" = None       # recorded on the waiting stream by finish_onload


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _resident(t: torch.Tensor) -> bool:
    """Tensors this process would move: device tensors on a GPU machine, every tensor without CUDA."""
    return t.device.type != "cpu" or not torch.cuda.is_available()


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class StorageOffloader:
    """Offloads the storages behind `collect()`'s named tensors (called at each offload, so
    lazily created state such as Adam's moments is included). `exclude()` names storage
    pointers to leave alone (e.g. model weights the optimizer shares)."""

    def __init__(self, collect: Callable[[], Iterable[tuple[str, torch.Tensor]]], what: str,
                 exclude: Callable[[], set[int]] | None = None):
        self._collect = collect
        self._exclude = exclude
        self.what = what
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []    # (tensor, its original view)
        self._storages: list[tuple[torch.UntypedStorage, int]] = []    # (storage, nbytes)
        self._host: list[torch.Tensor] = []                           # uint8 host copies, reused
        self._pending: _PendingOnload | None = None                   # an overlapped onload not waited on
        self._waited: _PendingOnload | None = None                    # the last one waited on (its timing)
        self._stream = None                                           # the side CUDA stream, made once

    @property
    def is_offloaded(self) -> bool:
        return bool(self._storages)

    @property
    def onload_pending(self) -> bool:
        """An overlapped onload whose copies nobody has waited on yet (`finish_onload`)."""
        return self._pending is not None

    def _plan(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.UntypedStorage, int]]]:
        skip = self._exclude() if self._exclude is not None else set()
        seen_t, seen_s = set(), {}
        records = []
        for name, t in self._collect():
            if id(t) in seen_t or not _resident(t):
                continue
            s = t.untyped_storage()
            if s.nbytes() == 0 or s.data_ptr() in skip:
                continue
            if not s.resizable():
                raise ValueError(f"{self.what}: tensor {name!r} has a non-resizable storage (e.g. memory-mapped "
                                 f"from a checkpoint); copy it into a regular tensor before offloading")
            seen_t.add(id(t))
            seen_s.setdefault(s.data_ptr(), (s, s.nbytes()))
            records.append((t, t.data))
        return records, list(seen_s.values())

    def offload(self) -> MoveStats:
        if self.is_offloaded:
            return MoveStats()
        self.finish_onload()                      # the host buffers are the pending copies' source
        _sync()
        t0 = time.perf_counter()
        records, storages = self._plan()
        if [n for _, n in storages] != [h.numel() for h in self._host]:
            pin = torch.cuda.is_available()
            self._host = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for _, n in storages]
        for (s, _), h in zip(storages, self._host):
            h.copy_(_bytes_view(s), non_blocking=True)
        _sync()                                   # host copies complete before the device bytes go
        for t, _ in records:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        for s, _ in storages:
            s.resize_(0)
        self._records, self._storages = records, storages
        n = sum(n for _, n in storages)
        return MoveStats(n, n, time.perf_counter() - t0)

    def onload(self, overlap: bool = False) -> MoveStats:
        """The storages back on the device. `overlap`: the copies run on a side stream and the
        tensors stay placeholders until `finish_onload()` (module docstring); the seconds are
        then the launch time only."""
        if not self.is_offloaded:
            return MoveStats()
        t0 = time.perf_counter()
        cuda = overlap and torch.cuda.is_available()
        pending = _PendingOnload(self._records)
        if cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            # the storages are (re)allocated on the current stream: the side stream waits for it,
            # so a reused block's earlier readers finish before the copy overwrites it
            self._stream.wait_stream(torch.cuda.current_stream())
            pending.start, pending.done = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        for (s, n), _ in zip(self._storages, self._host):
            s.resize_(n)
        with torch.cuda.stream(self._stream) if cuda else contextlib.nullcontext():
            if cuda:
                pending.start.record()
            for (s, _), h in zip(self._storages, self._host):
                dst = _bytes_view(s)
                dst.copy_(h, non_blocking=True)
                if cuda:
                    dst.record_stream(self._stream)   # the allocator keeps the block until the copy is done
            if cuda:
                pending.done.record()
        if not overlap:
            _sync()
        n = sum(n for _, n in self._storages)
        self._records, self._storages = [], []
        self._pending = pending
        if not overlap:
            self.finish_onload()
        return MoveStats(n, n, time.perf_counter() - t0)

    def finish_onload(self) -> None:
        """Wait (on the current stream, not the host) for an overlapped onload's copies and
        re-point the tensors at their views; a no-op when none is pending. The host buffers
        stay alive in `self._host` until the next offload, which waits here first."""
        pending = self._pending
        if pending is None:
            return
        if pending.done is not None:
            pending.ready = torch.cuda.Event(enable_timing=True)
            pending.ready.record()
            torch.cuda.current_stream().wait_event(pending.done)
        for t, view in pending.records:
            t.data = view
        self._pending, self._waited = None, pending

    def overlap_stats(self) -> OverlapStats | None:
        """Timing of the last overlapped CUDA onload that was waited on, read once (this call
        waits for its events); None on CPU, for a synchronous onload or when already read."""
        p, self._waited = self._waited, None
        if p is None or p.done is None:
            return None
        p.ready.synchronize()
        p.done.synchronize()
        return OverlapStats(copy_s=p.start.elapsed_time(p.done) / 1e3,
                            wait_s=max(p.ready.elapsed_time(p.done), 0.0) / 1e3)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class _Offloadable:
    """`onloaded()` for anything with offload()/onload()/is_offloaded; no overlapped onload by
    default (TrainingStateOffloader has one)."""

    def _reoffload(self) -> None:
        self.offload()

    def finish_onload(self) -> None:
        """Wait for an overlapped onload; nothing is ever pending here."""

    def overlap_stats(self) -> "OverlapStats | None":
        return None

    @contextlib.contextmanager
    def onloaded(self) -> Iterator[None]:
        """Resident inside the block; offloaded again afterwards (as before) if it was offloaded."""
        was = self.is_offloaded
        self.onload()
        try:
            yield
        finally:
            if was:
                self._reoffload()


class WeightOffloader(_Offloadable):
    """Parameters and buffers of one or more model chunks (GPTModel or its DDP wrapper).
    A forward while offloaded raises an error naming the model instead of a size mismatch."""

    def __init__(self, chunks):
        self.chunks = _as_list(chunks)
        self._storage = StorageOffloader(self._tensors, "WeightOffloader")
        self._guards: list = []
        self.last = MoveStats()

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, c in enumerate(self.chunks):
            for name, p in c.named_parameters():
                yield f"chunk{i}.{name}", p
            for name, b in c.named_buffers():
                yield f"chunk{i}.{name}", b

    def storage_ptrs(self) -> set[int]:
        """Device storage pointers of the weights (while resident)."""
        return {t.untyped_storage().data_ptr() for _, t in self._tensors() if t.untyped_storage().nbytes() > 0}

    @property
    def is_offloaded(self) -> bool:
        return self._storage.is_offloaded

    @property
    def resident_bytes(self) -> int:
        """Bytes of the weights' storages now allocated (0 while offloaded)."""
        seen = {}
        for _, t in self._tensors():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(v for k, v in seen.items() if k)

    def offload(self) -> MoveStats:
        if self.is_offloaded:
            return MoveStats()
        self.last = self._storage.offload()
        self._guards = [c.register_forward_pre_hook(_refuse_forward) for c in self.chunks]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self.last

    def onload(self) -> MoveStats:
        if not self.is_offloaded:
            return MoveStats()
        for g in self._guards:
            g.remove()
        self._guards = []
        self.last = self._storage.onload()
        return self.last


def _refuse_forward(module, args):
    raise RuntimeError(f"{type(module).__name__}: forward while its weights are offloaded "
                       f"(WeightOffloader); call onload() or use `with offloader.onloaded():`")


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a Megatron optimizer (ChainedOptimizer: each sub-optimizer's)."""
    from megatron.core.optimizer import ChainedOptimizer

    if isinstance(optimizer, ChainedOptimizer):
        return [t for sub in optimizer.chained_optimizers for t in _torch_optimizers(sub)]
    inner = optimizer.optimizer
    return [] if inner is None else [inner]


class TrainingStateOffloader(_Offloadable):
    """A trainable role wrapped in Megatron DDP with a Megatron optimizer: `offload()` frees
    the DDP grad buffers and moves the optimizer state (fp32 master params, Adam moments) to
    host memory; `offload(weights=True)` moves the model weights too. Call between optimizer
    steps; `onload()` restores all of it, so the next step is bit-identical to one without
    the round trip."""

    def __init__(self, ddp_chunks, optimizer, *, offload_weights: bool = False):
        self.offload_weights = offload_weights            # what a plain `offload()` does with the weights
        self.ddp = _as_list(ddp_chunks)
        self.optimizer = optimizer
        self.weights = WeightOffloader([d.module for d in self.ddp])
        self._opt = StorageOffloader(self._optimizer_tensors, "optimizer state", exclude=self._not_optimizer_owned)
        self._grads_freed = 0
        self._with_weights = False
        self.last = MoveStats()

    def _reoffload(self) -> None:
        self.offload(weights=self._with_weights)

    def _optimizer_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k, opt in enumerate(_torch_optimizers(self.optimizer)):
            for g, group in enumerate(opt.param_groups):
                for i, p in enumerate(group["params"]):
                    yield f"optimizer{k}.param_groups[{g}].params[{i}]", p
            for i, state in enumerate(opt.state.values()):
                for key, v in state.items():
                    if isinstance(v, torch.Tensor):
                        yield f"optimizer{k}.state[{i}][{key!r}]", v

    def _grad_buffers(self) -> list:
        return [b for d in self.ddp for b in d.buffers + d.expert_parallel_buffers if b.grad_data is not None]

    def _not_optimizer_owned(self) -> set[int]:
        """Storages the optimizer shares with the model weights or grad buffers: moved (or not)
        with those, never as optimizer state."""
        grads = {b.grad_data.untyped_storage().data_ptr() for b in self._grad_buffers()}
        return self.weights.storage_ptrs() | grads

    @property
    def is_offloaded(self) -> bool:
        return self._opt.is_offloaded or self._grads_freed > 0 or self.weights.is_offloaded

    @property
    def onload_pending(self) -> bool:
        """The optimizer state's overlapped copy has not been waited on (`finish_onload`)."""
        return self._opt.onload_pending

    def finish_onload(self) -> None:
        """Before the optimizer (or a checkpoint) reads its state after `onload(overlap_optimizer=True)`."""
        self._opt.finish_onload()

    def overlap_stats(self) -> OverlapStats | None:
        """The last overlapped optimizer-state onload's copy time and stall (CUDA), once."""
        return self._opt.overlap_stats()

    def offload(self, weights: bool | None = None) -> MoveStats:
        """Idempotent; `weights` (default: `offload_weights`) also moves the model weights, also
        after an earlier grads+optimizer offload."""
        weights = self.offload_weights if weights is None else weights
        t0 = time.perf_counter()
        stats = self._opt.offload()                        # first: its exclusions read resident pointers
        if not self._grads_freed:
            freed = sum(b.grad_data.untyped_storage().nbytes() for b in self._grad_buffers())
            cuda = torch.cuda.is_available()
            for d in self.ddp:
                d.offload_grad_buffers(synchronize=cuda, empty_cache=False)
            self._grads_freed = freed
            stats = stats + MoveStats(0, freed, 0.0)
        if weights:
            stats = stats + self.weights.offload()
        self._with_weights = self.weights.is_offloaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.last = MoveStats(stats.bytes_copied, stats.bytes_freed, time.perf_counter() - t0)
        return self.last

    def onload(self, overlap_optimizer: bool = False) -> MoveStats:
        """Weights and grad buffers (re-allocated, zeroed) are ready on return: the forward and
        backward need them. `overlap_optimizer`: the optimizer state's copy is launched last,
        on a side stream, and waited on by `finish_onload()` (module docstring)."""
        t0 = time.perf_counter()
        stats = self.weights.onload()
        if self._grads_freed:
            for d in self.ddp:
                d.restore_grad_buffers(synchronize=torch.cuda.is_available())
            stats = stats + MoveStats(0, self._grads_freed, 0.0)
            self._grads_freed = 0
        stats = stats + self._opt.onload(overlap=overlap_optimizer)
        self.last = MoveStats(stats.bytes_copied, stats.bytes_freed, time.perf_counter() - t0)
        return self.last


class Offloadable:
    """`offload()` / `onload()` for a role that holds `self.offloader` (a
    `models.offload` offloader, or None: nothing to move), and `onloaded()` for a
    scope that needs the role on its device."""

    offloader = None

    def offload(self) -> "MoveStats | None":
        return self.offloader.offload() if self.offloader is not None else None

    def onload(self) -> "MoveStats | None":
        return self.offloader.onload() if self.offloader is not None else None

    @contextlib.contextmanager
    def onloaded(self) -> Iterator[None]:
        """The role on its device for the scope; back where it was afterwards."""
        was = self.offloader is not None and self.offloader.is_offloaded
        if was:
            self.onload()
        try:
            yield
        finally:
            if was:
                self.offload()
