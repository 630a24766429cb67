"""`python`: run a code snippet in an isolated subprocess and return its output.

Isolation is process-level, not a security boundary: `python -I -S` (no user site,
no env vars, no cwd on sys.path), an empty environment, a fresh temp directory,
CPU/memory/file-size/process limits via `resource` (POSIX), a wall-time kill and
truncated output. Run untrusted policies inside a container as well.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from megatron_rl.agent.tools.registry import ToolFailure, register_tool

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


def run_code(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_chars: int = 2000) -> str:
    """stdout (+ stderr) of `code`, or a `ToolFailure` on timeout / non-zero exit."""
    with tempfile.TemporaryDirectory(prefix="mrl_py_") as cwd:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                    env={"PATH": "/usr/bin:/bin"},
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

    def batch_call(self, queries: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(queries)))) as pool:
            return list(pool.map(lambda q: run_code(q, self.timeout_s, self.memory_mb, self.max_chars),
                                 queries))
