"""Reward worker processes die with the trainer: a SIGKILLed parent leaves none behind."""
import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import os, sys, time
from megatron_rl.rewards.pool import WorkerPool, _worker_pid
pool = WorkerPool("process", 2, timeout_s=30)
pids = {status_value[1] for status_value in pool.map(_worker_pid, [()] * 8)}
print(" ".join(map(str, sorted(pids))), flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_reward_workers_die_when_the_trainer_is_sigkilled():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers and all(alive(p) for p in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 10
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if alive(p)], "reward workers outlived their SIGKILLed parent"
    finally:
        parent.kill()
