"""The OS sandbox around the `python` tool's interpreter: no network and a read-only file
system except the call's own temporary directory.

Two backends, the first the machine has: bubblewrap (`bwrap`: read-only bind of `/`, fresh
`/dev` `/proc`, every namespace unshared, dies with its parent) or util-linux `unshare -rmn`
(an unprivileged user + mount + network namespace: every mount remounted read-only, the
temporary directory bound read-write on top; the network namespace has only a downed
loopback, so not even a local server is reachable). `sandbox_kind()` probes once.
"""
from __future__ import annotations

import functools
import shutil
import subprocess

# remount everything read-only, bind the work dir read-write on top, then run the command
_UNSHARE_SETUP = r'''
d="$1"; shift
awk '{print $2}' /proc/self/mounts | while read -r m; do mount -o remount,bind,ro "$m" 2>/dev/null; done
mount --bind "$d" "$d" && mount -o remount,bind,rw "$d" || { echo "sandbox: cannot bind $d" >&2; exit 97; }
cd "$d" && exec "$@"
'''


@functools.lru_cache(maxsize=1)
def sandbox_kind() -> str | None:
    """`bwrap`, `unshare` or None: the first backend that can start a process here."""
    for kind in ("bwrap", "unshare"):
        if shutil.which(kind) is None:
            continue
        try:
            ok = subprocess.run(wrap(kind, "/tmp", ["true"]), capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return kind
    return None


def wrap(kind: str, workdir: str, argv: list[str]) -> list[str]:
    """`argv` run inside the `kind` sandbox with `workdir` its only writable place (and cwd)."""
    if kind == "bwrap":
        return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", workdir, workdir,
                "--unshare-all", "--die-with-parent", "--new-session", "--chdir", workdir, "--", *argv]
    if kind == "unshare":
        return ["unshare", "-rmn", "--", "sh", "-c", _UNSHARE_SETUP, "sh", workdir, *argv]
    raise ValueError(f"unknown sandbox {kind!r} (bwrap | unshare)")
