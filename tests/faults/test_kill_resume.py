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
    assert fault_soak.soak(fault_soak.random_kills(12, seed=7), steps=6, workdir=tmp_path) == []
