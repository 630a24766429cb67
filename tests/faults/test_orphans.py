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


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")[:120]
    except OSError:
        return "?"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_no_child_outlives_a_trainer_sigkilled_mid_save(tmp_path):
    """The trainer stops itself while its checkpoint is being written (every file written,
    no manifest); its children (Megatron's checkpoint-writer Manager server, the resource
    tracker, ...) are listed from /proc; after a SIGKILL of the trainer none survives."""
    from megatron_rl.trainer.children import descendants
    from tools.fault_soak import _RUN, tiny_setup

    overrides, _ = tiny_setup(tmp_path, steps=1)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "MEGATRON_RL_FAULT_STOP": "save_write:1"}
    with open(tmp_path / "trainer.log", "w") as log:
        trainer = subprocess.Popen([sys.executable, "-c", _RUN, *overrides, f"logging.run_dir={tmp_path / 'run'}"],
                                   cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not _stopped(trainer.pid):
            assert trainer.poll() is None and time.time() < deadline, (tmp_path / "trainer.log").read_text()[-3000:]
            time.sleep(0.1)
        children = {p: _start_time(p) for p in descendants(trainer.pid)}
        assert children, "expected the checkpoint writer's Manager server among the trainer's children"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        deadline = time.time() + 10
        survivors = children
        while survivors and time.time() < deadline:
            time.sleep(0.1)
            survivors = {p: t for p, t in children.items() if alive(p) and _start_time(p) == t}
        assert not survivors, (f"{len(survivors)} of the trainer's {len(children)} children outlived it: "
                               f"{[_cmdline(p) for p in survivors]}")
    finally:
        try:
            os.killpg(trainer.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


FORKING_PARENT = """
import multiprocessing as mp, sys, time
from megatron_rl.trainer.children import die_with_trainer
die_with_trainer()
if __name__ == "__main__":
    p = mp.get_context(sys.argv[1]).Process(target=time.sleep, args=(60,))
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_forked_and_spawned_children_die_with_a_sigkilled_parent(tmp_path, start_method):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "parent.py"
    script.write_text(FORKING_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), start_method], cwd=root, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": root}, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 10
        while alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(child), f"a {start_method} child outlived its SIGKILLed parent"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
