"""Run reward calls on a worker pool with a per-call time limit.

At most `num_workers` calls are in flight, so each one starts when submitted and its
deadline is `submit time + timeout_s`. A call past its deadline is reported as a
timeout. Its worker is stuck: a process pool is killed and restarted (the other
in-flight calls are resubmitted); a thread cannot be killed, so it is abandoned to
finish on its own and a fresh thread pool takes the new calls (and, being
non-daemon, delays interpreter exit until it returns).

Worker processes die with the trainer: each asks the kernel for SIGKILL when its parent
dies (Linux `prctl(PR_SET_PDEATHSIG)`), so a SIGKILLed or pre-empted trainer leaves none.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

OK, FAIL, TIMEOUT = "ok", "fail", "timeout"


def guarded(fn: Callable, *args) -> tuple[str, Any]:
    """Run `fn` in a worker, returning (status, value); exceptions become text so that
    unpicklable exceptions cannot break a process pool."""
    try:
        return OK, fn(*args)
    except Exception as e:  # noqa: BLE001 - any reward failure gets the fallback score
        return FAIL, f"{type(e).__name__}: {e}"


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (and exit now if it already has).
    Elsewhere a no-op: the pool's own shutdown is the only cleanup."""
    import sys
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:          # the parent died before the prctl
        os._exit(1)


def _init_worker(parent_pid: int, initializer: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def _worker_pid() -> int:
    time.sleep(0.05)   # so that one fast worker cannot answer for a slow-starting one
    return os.getpid()


class WorkerPool:
    def __init__(self, kind: str, num_workers: int, timeout_s: float, mp_start_method: str = "spawn",
                 initializer: Callable | None = None, initargs: tuple = ()):
        self.kind = kind
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.mp_start_method = mp_start_method
        self.initializer = initializer
        self.initargs = initargs
        self._executor: Executor | None = None

    def _pool(self) -> Executor:
        if self._executor is None:
            if self.kind == "process":
                self._executor = ProcessPoolExecutor(
                    self.num_workers, mp_context=multiprocessing.get_context(self.mp_start_method),
                    initializer=_init_worker, initargs=(os.getpid(), self.initializer, self.initargs))
                self._wait_for_workers(self._executor)
            else:
                self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="reward")
        return self._executor

    def _wait_for_workers(self, executor: ProcessPoolExecutor, limit_s: float = 300.0) -> None:
        """Block until every worker has answered once, so that process start-up (imports,
        seconds under load) is not charged to the first calls' time limits."""
        seen: set[int] = set()
        give_up = time.monotonic() + limit_s
        try:
            while len(seen) < self.num_workers and time.monotonic() < give_up:
                seen.update(f.result() for f in [executor.submit(_worker_pid) for _ in range(self.num_workers)])
        except BrokenProcessPool as e:
            raise RuntimeError(f"reward worker processes ({self.mp_start_method}) died while starting; "
                               f"their stderr says why (with spawn, the main script must be importable "
                               f"and guarded by `if __name__ == '__main__'`)") from e

    def _discard(self) -> None:
        if self._executor is None:
            return
        if isinstance(self._executor, ProcessPoolExecutor):
            # Python 3.11 has no public way to stop a busy worker (3.14 adds kill_workers()).
            for proc in list(getattr(self._executor, "_processes", {}).values()):
                proc.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> list[tuple[str, Any]]:
        """`[(status, value)]` per task, in order: `guarded(fn, *task)` or (TIMEOUT, None)."""
        if self.num_workers == 0:
            return [guarded(fn, *t) for t in tasks]
        results: list[tuple[str, Any] | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        inflight: dict[Future, tuple[int, float]] = {}
        while pending or inflight:
            while pending and len(inflight) < self.num_workers:
                i = pending.popleft()
                future = self._pool().submit(guarded, fn, *tasks[i])   # may start workers first
                inflight[future] = (i, time.monotonic() + self.timeout_s)
            next_deadline = min(d for _, d in inflight.values())
            done, _ = wait(list(inflight), timeout=max(0.0, next_deadline - time.monotonic()),
                           return_when=FIRST_COMPLETED)
            broken = False
            for f in done:
                i, _ = inflight.pop(f)
                try:
                    results[i] = f.result()
                except BrokenProcessPool as e:
                    results[i], broken = (FAIL, f"worker process died ({e})"), True
            now = time.monotonic()
            expired = [f for f, (_, d) in inflight.items() if d <= now and not f.done()]
            for f in expired:
                results[inflight.pop(f)[0]] = (TIMEOUT, None)
            if broken or (expired and self.kind == "process"):
                for f, (i, _) in inflight.items():     # lost with the pool: run again
                    f.cancel()
                    pending.appendleft(i)
                inflight.clear()
                self._discard()
            elif expired:
                self._executor.shutdown(wait=False)    # stuck threads finish on their own
                self._executor = None
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
