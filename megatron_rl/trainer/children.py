"""Every process the trainer starts dies with it, also when the trainer is SIGKILLed.

Why: a SIGKILL runs no cleanup, and children that outlive the trainer pile up on a node with
requeues. Megatron's checkpoint writer (`dist_checkpointing/strategies/filesystem_async.py`)
keeps a `multiprocessing` Manager server per process (spawn context, ~275 MB) and forks a
writer per file; before this module two processes per killed trainer survived with parent 1.

`die_with_trainer()` (once, at trainer start; Linux only, elsewhere a no-op) asks the kernel
for `PR_SET_PDEATHSIG=SIGKILL` in the trainer's children, without touching Megatron:

- forked children (multiprocessing's fork context, Megatron's per-file writers, anything
  `os.fork`s from the main thread): an `os.register_at_fork` hook runs in the child;
- spawned children (the spawn context: the Manager server, spawn pools): multiprocessing's
  own `set_executable` points at a tiny launcher that sets the signal and execs the real
  interpreter (the signal survives `execve`). multiprocessing's resource tracker is spared:
  it exits by itself once the last process holding its pipe is gone, after unlinking what
  they leaked.

Caveats: the kernel ties the signal to the parent *thread*, so children forked or spawned
from other threads are left alone by the fork hook (a thread that exits would kill them);
the launcher assumes spawns come from the main thread too (Megatron's do). A launcher
directory on a `noexec` mount leaves spawned children uncovered (a warning says so).
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

PR_SET_PDEATHSIG = 1
TRAINER_PID_ENV = "MEGATRON_RL_TRAINER_PID"    # read by the launcher: exit if the trainer is already gone

_installed = False
_fork_parent: list[int | None] = [None]        # set in the parent just before a main-thread fork

LAUNCHER = """#!{python}
# megatron-rl: the spawn children of a trainer die with it (megatron_rl/trainer/children.py)
import ctypes, os, signal, sys
if "--multiprocessing-fork" in sys.argv:      # not the resource tracker: it must outlive its clients
    ctypes.CDLL(None, use_errno=True).prctl({pr}, signal.SIGKILL, 0, 0, 0)
    trainer = os.environ.get("{env}")
    if trainer and not os.path.exists("/proc/" + trainer):
        os._exit(1)                           # the trainer died before the prctl
os.execv({python!r}, [{python!r}] + sys.argv[1:])
"""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """`prctl(PR_SET_PDEATHSIG, sig)` for this process (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _before_fork() -> None:
    _fork_parent[0] = os.getpid() if threading.current_thread() is threading.main_thread() else None


def _after_fork_in_child() -> None:
    parent = _fork_parent[0]
    if parent is None:
        return
    try:
        set_parent_death_signal()
    except OSError:
        return
    if os.getppid() != parent:                 # the parent died between fork and prctl
        os._exit(1)


def launcher_path(python: str = sys.executable) -> Path | None:
    """The spawn launcher for `python`, written once per user and interpreter (atomically:
    ranks on one node may race); None where it cannot run (noexec mount, long shebang)."""
    text = LAUNCHER.format(python=python, pr=PR_SET_PDEATHSIG, env=TRAINER_PID_ENV)
    if len(f"#!{python}") > 127:               # older kernels cut the shebang at 128 bytes
        return None
    d = Path(tempfile.gettempdir()) / f"megatron_rl-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    if os.statvfs(d).f_flag & os.ST_NOEXEC:
        return None
    path = d / f"python-pdeath-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    if not path.exists():
        tmp = d / f".{path.name}.{os.getpid()}"
        tmp.write_text(text)
        tmp.chmod(0o700)
        os.replace(tmp, path)
    return path


def die_with_trainer() -> None:
    """Give every child this process starts from now on `PR_SET_PDEATHSIG=SIGKILL` (module
    docstring). Idempotent; a no-op off Linux."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    import multiprocessing

    _installed = True
    os.environ[TRAINER_PID_ENV] = str(os.getpid())
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    launcher = launcher_path()
    if launcher is None:
        warnings.warn(f"megatron-rl: no spawn launcher under {tempfile.gettempdir()} (noexec mount or a "
                      f"shebang over 127 bytes for {sys.executable}); spawned children such as Megatron's "
                      f"checkpoint-writer Manager may outlive a killed trainer", RuntimeWarning, stacklevel=2)
        return
    multiprocessing.set_executable(str(launcher))


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (Linux /proc: every thread's `children`), depth first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out
