"""Fault-injection hooks for the reliability suite (tests/faults/, tools/fault_soak.py).

Off unless an environment variable asks, and then only in the process that reads it:

- `MEGATRON_RL_FAULT_KILL="point:n"`: SIGKILL this process the n-th time (from 1) it reaches
  `point`. Points: `step` (start of a rollout step), `update` (after the backward, before the
  optimizer step), `save_write` (every file of a checkpoint written, no manifest yet),
  `save_renamed` (`step_N` renamed, `latest` not yet moved), `saved` (save complete),
  `save_async` (`trainer.async_save`: the background write has just started).
- `MEGATRON_RL_FAULT_STOP="point:n"`: SIGSTOP instead, so a test can list the process's
  children before it SIGKILLs it (tests/faults/test_orphans.py).
- `MEGATRON_RL_FAULT_NAN="2,5"`: the loss of this process's 2nd and 5th optimizer steps is
  multiplied by NaN (the step guard must skip them).
- `MEGATRON_RL_FAULT_ENOSPC="n"`: the n-th checkpoint save raises `OSError(ENOSPC)` after
  its files are written (a full disk).

A SIGKILL, unlike an exception, runs no cleanup: what survives is what a pre-empted job leaves.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_hits: Counter = Counter()


def _spec(var: str) -> str:
    return os.environ.get(var, "").strip()


def fault_point(point: str) -> None:
    """Count a visit of `point`; SIGKILL (SIGSTOP) the process if `MEGATRON_RL_FAULT_KILL`
    (`MEGATRON_RL_FAULT_STOP`) names this visit."""
    kill, stop = _spec("MEGATRON_RL_FAULT_KILL"), _spec("MEGATRON_RL_FAULT_STOP")
    if not kill and not stop:
        return
    _hits[point] += 1
    for spec, sig in ((kill, signal.SIGKILL), (stop, signal.SIGSTOP)):
        name, _, n = spec.partition(":")
        if spec and name == point and _hits[point] == int(n or 1):
            os.kill(os.getpid(), sig)


def nan_loss_now() -> bool:
    """True if this optimizer step (counted per process) is one `MEGATRON_RL_FAULT_NAN` poisons."""
    spec = _spec("MEGATRON_RL_FAULT_NAN")
    if not spec:
        return False
    _hits["optimizer_step"] += 1
    return _hits["optimizer_step"] in {int(s) for s in spec.split(",") if s.strip()}


def disk_full_now(where: str) -> None:
    """Raise `OSError(ENOSPC)` at the save `MEGATRON_RL_FAULT_ENOSPC` names (counted per process)."""
    spec = _spec("MEGATRON_RL_FAULT_ENOSPC")
    if not spec:
        return
    _hits["save"] += 1
    if _hits["save"] == int(spec):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
