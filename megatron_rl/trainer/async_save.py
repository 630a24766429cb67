"""Asynchronous checkpoint saves (`trainer.async_save: true`) through Megatron
dist-checkpointing's own machinery: `dist_checkpointing.save(..., async_sharded_save=True)`
returns an `AsyncRequest` per role, and one `AsyncCallsQueue` runs them in a forked writer
process while training goes on.

Why the manager needs more than Megatron's queue: a checkpoint is complete only after every
role's files are on disk, so the manifest, the checksums and the rename `step_N.tmp ->
step_N` are the request's last finalize step. Until then `step_N.tmp` is not a checkpoint: a
kill during the write leaves the previous one as the newest. One save is in flight at a time
(the next save finalizes the last one first), which bounds host memory to one copy of the
state (the GPU -> host preload, or on CPU the forked writer's copy-on-write pages).

Finalizing is collective (every rank calls it at the same point): at the next save, at the
end of the run, before a resume, and at each step when the write has already finished on
every rank (`poll`: one small all-reduce while a save is pending, nothing otherwise).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

_collector: list | None = None       # the requests of the save being collected (None: saves are synchronous)


def async_requested() -> bool:
    """Whether the role being saved should hand its dist-checkpoint write to `collect_request`."""
    return _collector is not None


def collect_request(request) -> None:
    """Called by `checkpoint.save_trained` with the `AsyncRequest` of one role's files."""
    if _collector is None:
        raise RuntimeError("an asynchronous checkpoint request outside AsyncSaver.collect()")
    if request is not None:
        _collector.append(request)


class AsyncSaver:
    """One checkpoint save in flight: `collect()` around the roles' saves, `schedule(finalize)`
    to start the write, `finalize()` / `poll()` to complete it."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)   # a forked writer per save (Megatron-LM's default)
        self._requests: list = []

    @property
    def pending(self) -> bool:
        return self.queue.get_num_unfinalized_calls() > 0

    @contextmanager
    def collect(self):
        """Roles saved inside this block hand their writes to this saver instead of writing."""
        global _collector
        if self.pending:
            raise RuntimeError("AsyncSaver.collect: finalize the save in flight first (one at a time)")
        _collector, self._requests = [], []
        try:
            yield
        finally:
            self._requests, _collector = _collector, None

    def schedule(self, finalize: Callable[[list], None]) -> None:
        """Start the collected writes in one forked process. Once all of them finished on every
        rank, `finalize(megatron_finalize_fns)` runs on every rank: it calls Megatron's own
        finalize steps (the write results, `.metadata`) first, then the manifest + rename.
        Collective."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

        requests, self._requests = self._requests, []
        writes = []
        for r in requests:          # the GPU -> host copies happen here, before the fork (CUDA stays in the parent)
            if r.async_fn is not None:
                args = list(r.async_fn_args)
                if r.preload_fn is not None:
                    args[1] = r.preload_fn()
                writes.append((r.async_fn, args, r.async_fn_kwargs))
        megatron_fns = [fn for r in requests for fn in r.finalize_fns]
        self.queue.schedule_async_request(AsyncRequest(_write_all, (writes,), [lambda: finalize(megatron_fns)]))

    def finalize(self) -> None:
        """Wait for the save in flight (if any) and complete it. Collective."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def poll(self) -> None:
        """Complete the save in flight if its write already finished on every rank. Collective."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=False)


def _write_all(writes: list) -> None:
    """In the forked writer: each role's write (host tensors by now), one after the other."""
    for fn, args, kwargs in writes:
        fn(*args, **kwargs)
