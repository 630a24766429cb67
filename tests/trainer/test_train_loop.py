"""End-to-end training on a tiny offline model: the loop runs, writes metrics and
checkpoints, and a killed-then-resumed run reproduces an uninterrupted one."""
import json

import pytest

from megatron_rl.trainer.main import train_main

VOLATILE = ("timing/", "perf/")


def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE) and k not in ("time", "timestamp")}


def test_grpo_loop_writes_metrics_and_final_checkpoint(tiny_run, capsys):
    overrides, run_dir = tiny_run
    assert train_main(None, overrides) == 0
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == [0, 1, 2, 3]
    for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "actor/ppo_kl", "response_length/mean",
                "timing/rollout", "timing/update", "perf/tokens_per_s"):
        assert key in rows[1], key
    assert (run_dir / "checkpoints" / "step_000003" / "trainer_state.json").exists()
    assert "validation reward:" in capsys.readouterr().out


def test_resume_reproduces_uninterrupted_run(tiny_run, tmp_path):
    overrides, run_dir = tiny_run
    full = overrides + ["trainer.save_every=1", "trainer.resume=none"]
    assert train_main(None, full) == 0
    reference = {r["step"]: stable(r) for r in read_metrics(run_dir)}

    resumed_dir = tmp_path / "resumed"
    part = [o for o in overrides if not o.startswith(("logging.run_dir", "trainer.total_steps"))]
    part += [f"logging.run_dir={resumed_dir}", "trainer.save_every=1"]
    assert train_main(None, part + ["trainer.total_steps=2", "trainer.resume=none"]) == 0   # "killed" after 2
    assert train_main(None, part + ["trainer.total_steps=3", "trainer.resume=auto"]) == 0
    resumed = {r["step"]: stable(r) for r in read_metrics(resumed_dir)}
    assert set(resumed) >= {1, 2, 3}
    for key, value in reference[3].items():
        if key == "val/reward" or key == "step":
            continue
        assert resumed[3][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
