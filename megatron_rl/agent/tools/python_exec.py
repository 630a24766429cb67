"""`python`: run a code snippet in a sandboxed subprocess and return its output.

The interpreter runs inside an OS sandbox (tools/sandbox.py: bubblewrap or an unprivileged
`unshare` namespace): no network, nothing writable but a fresh temporary directory. Around
it: `python -I -S` (no user site, no env vars, no cwd on sys.path), an empty environment,
CPU/memory/file-size limits via `resource`, a wall-time kill of the process group and
truncated output. On a machine with neither backend the tool refuses to be built unless
`agent.allow_unsandboxed_python: true`, which runs it with the limits only.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from megatron_rl.agent.tools.registry import ToolFailure, register_tool
from megatron_rl.agent.tools.sandbox import sandbox_kind, wrap

try:
    import resource
except ImportError:          # Windows: wall-time limit only
    resource = None


def _limits(cpu_s: int, memory_bytes: int):
    def apply():
        os.setsid()          # own process group: the wall-time kill takes its children too
        if resource is None:
            return
        for name, value in (("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", memory_bytes),
                            ("RLIMIT_FSIZE", 1 << 20), ("RLIMIT_CORE", 0)):
            lim = getattr(resource, name, None)
            if lim is not None:
                try:
                    resource.setrlimit(lim, (value, value))
                except (ValueError, OSError):
                    pass     # a hard limit below ours: keep the stricter one
    return apply


def run_code(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_chars: int = 2000,
             sandbox: str | None = None) -> str:
    """stdout (+ stderr) of `code`, or a `ToolFailure` on timeout / non-zero exit. `sandbox`:
    `bwrap` | `unshare` (tools/sandbox.py) or None (limits only)."""
    with tempfile.TemporaryDirectory(prefix="mrl_py_") as cwd:
        argv = [sys.executable, "-I", "-S", "-"]
        try:
            proc = subprocess.Popen(wrap(sandbox, cwd, argv) if sandbox else argv, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                    env={"PATH": "/usr/bin:/bin", "TMPDIR": cwd, "HOME": cwd},
                                    preexec_fn=_limits(int(timeout_s) + 1, memory_mb << 20))
        except OSError as e:
            return ToolFailure(f"python error: could not start interpreter: {e}")
        try:
            out, err = proc.communicate(code.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ToolFailure(f"python error: timed out after {timeout_s:g}s")
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return ToolFailure(_cut(f"{text}python error: {tail[0]}", max_chars))
    return _cut(text, max_chars)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def _cut(text: str, max_chars: int) -> str:
    return text[:max_chars] + ("...[truncated]" if len(text) > max_chars else "")


@register_tool("python")
class PythonExec:
    def __init__(self, config=None, workers: int = 4):
        self.timeout_s = getattr(config, "python_timeout_s", 5.0)
        self.memory_mb = getattr(config, "python_memory_mb", 512)
        self.max_chars = getattr(config, "max_tool_output_chars", 2000)
        self.workers = workers
        self.sandbox = sandbox_kind()
        if self.sandbox is None and not getattr(config, "allow_unsandboxed_python", False):
            raise RuntimeError("agent.tools has 'python' but this machine has no sandbox for it (neither bubblewrap "
                               "`bwrap` nor unprivileged `unshare -rmn` works): model-written code would run with "
                               "network access and your write permissions. Install bubblewrap, or set "
                               "agent.allow_unsandboxed_python: true to run it with resource limits only.")
        if self.sandbox is None:
            print("agent: the python tool runs UNSANDBOXED (agent.allow_unsandboxed_python: true): resource "
                  "limits only, network and file system reachable", flush=True)

    def batch_call(self, queries: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(queries)))) as pool:
            return list(pool.map(lambda q: run_code(q, self.timeout_s, self.memory_mb, self.max_chars,
                                                    self.sandbox), queries))
