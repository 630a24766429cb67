"""SIGKILL the trainer rank of a disaggregated one-step-off run mid-update (torchrun takes the
rollout rank down with it), resume with `trainer.resume: auto`: the buffered batch comes back
from the checkpoint, so every step trains the same prompts (none lost, none repeated) and logs
the same metrics as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.async_rl.test_async_modes import LENGTH_REWARD, stable, trained

pytestmark = [pytest.mark.multiproc, pytest.mark.slow, pytest.mark.timeout(400)]
ROOT = Path(__file__).resolve().parents[2]


def torchrun(config: Path, overrides: list[str], env_extra: dict | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_rl.cli", "train", "--config", str(config), *overrides]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return proc.wait(200)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)      # anything the launcher left behind
        except ProcessLookupError:
            pass


def test_sigkill_then_resume_loses_and_repeats_no_sample(tiny_run, tmp_path):
    overrides, _ = tiny_run
    (tmp_path / "words.py").write_text(LENGTH_REWARD)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    base = [o for o in overrides if not o.startswith(("reward.", "logging.run_dir", "trainer.total_steps"))]
    base += ["reward.name=words", f"reward.custom_functions={{words: '{tmp_path / 'words.py'}:words'}}",
             "reward.num_workers=0", "trainer.total_steps=4", "trainer.save_every=1", "trainer.keep_last=0",
             "trainer.final_validation=false", "rollout.placement=disaggregated", "rollout.num_ranks=1",
             "trainer.async.mode=one_step_off"]
    ref_dir, kill_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    assert torchrun(config, base + [f"logging.run_dir={ref_dir}", "trainer.resume=none"]) == 0
    killed = torchrun(config, base + [f"logging.run_dir={kill_dir}", "trainer.resume=none"],
                      {"MEGATRON_RL_FAULT_KILL": "update:3"})         # step 3, after its backward
    assert killed != 0
    assert (kill_dir / "checkpoints" / "step_000002").exists()
    assert not (kill_dir / "checkpoints" / "step_000003").exists()
    assert torchrun(config, base + [f"logging.run_dir={kill_dir}", "trainer.resume=auto"]) == 0

    ref, got = trained(ref_dir), trained(kill_dir)
    assert got == ref                                                # same prompts, same versions per step
    uids = [u for s in sorted(got) for u in got[s][0]]
    assert len(uids) == 8                                            # 4 steps x 2 prompts
    rows = lambda d: {r["step"]: stable(r) for r in map(json.loads, open(d / "metrics.jsonl"))}  # noqa: E731
    r_ref, r_got = rows(ref_dir), rows(kill_dir)
    for step in (3, 4):
        for k, v in r_ref[step].items():
            assert r_got[step][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (step, k)
