"""SIGKILL a trainer subprocess (mid-update, while a checkpoint is written, right after its
rename), resume with `trainer.resume=auto` each time: every logged step equals an
uninterrupted run's, exactly (CPU, deterministic). tools/fault_soak.py runs the long version."""
import pytest

from tools import fault_soak


def test_three_kills_then_resume_equals_uninterrupted_run(tmp_path):
    kills = ["update:2", "save_write:1", "save_renamed:1"]   # step 2's update, its save twice
    log = []
    assert fault_soak.soak(kills, steps=3, workdir=tmp_path, log=log.append) == []
    assert len(log) == 3 and all("rc= -9" in line for line in log), log


@pytest.mark.slow
def test_soak_twelve_random_kills(tmp_path):
    """At least 10 SIGKILLs delivered (each process killed at its first hit of a point), then
    the completed run's per-step metrics equal the uninterrupted run's exactly."""
    kills = fault_soak.random_kills(12, seed=7, max_hit=1)
    assert fault_soak.soak(kills, steps=14, workdir=tmp_path) == []
    assert fault_soak.KILLED[0] >= 10
