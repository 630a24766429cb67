"""The trainer follows the run plan: optimizer steps per rollout and the LR horizon are the
plan's at DP=1 and DP=2 (mini-batch sizes are global), `plan.json` is written, and
`actor.fused_loss: off` trains through the pure-torch loss."""
import json

import pytest
import torch

from tests.helpers import fit_trainer, run_multiproc

# 2 prompts x n=2 = 4 samples per step; global mini-batches of 2 -> 2 optimizer steps per rollout
PLAN_KEYS = ["actor.mini_batch_size=2", "actor.optim.lr_schedule=linear", "actor.optim.min_lr=0.0",
             "trainer.total_steps=3", "trainer.val_before_train=false", "trainer.save_final=false"]


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_optimizer_steps_and_lr_horizon_follow_the_plan(tiny_run):
    overrides, run_dir = tiny_run
    tr = fit_trainer(overrides + PLAN_KEYS)
    actor = tr.plan.role("actor")
    assert actor.optimizer_steps_per_rollout == 2 and actor.lr_horizon_steps == 6
    rows = [r for r in _rows(run_dir) if "actor/optimizer_steps" in r]
    assert [r["actor/optimizer_steps"] for r in rows] == [2.0, 2.0, 2.0]
    assert rows[1]["actor/lr"] > 0.0                        # not decayed early (the old horizon was 3)
    assert tr.actor.scheduler.num_steps == 6                # the schedule ends exactly at the last step
    assert tr.actor.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["batch"]["optimizer_steps_per_rollout"] == 2


def _dp_train(rank, world, overrides, out):
    tr = fit_trainer(overrides)
    torch.save({"steps": tr.plan.role("actor").optimizer_steps_per_rollout,
                "per_rank": tr.plan.role("actor").mini_batch_samples_per_rank,
                "sched": tr.actor.scheduler.num_steps}, f"{out}.{rank}")


@pytest.mark.multiproc
def test_dp2_takes_the_same_optimizer_steps_as_dp1(tiny_run, tmp_path):
    overrides, run_dir = tiny_run
    run_multiproc(_dp_train, 2, (overrides + PLAN_KEYS, str(tmp_path / "dp")))
    for rank in (0, 1):
        r = torch.load(tmp_path / f"dp.{rank}")
        assert r == {"steps": 2, "per_rank": 1, "sched": 6}
    assert [row["actor/optimizer_steps"] for row in _rows(run_dir) if "actor/optimizer_steps" in row] == [2.0] * 3


def test_fused_loss_off_trains_through_megatron_rl_train(tiny_run):
    from megatron_rl.trainer.main import train_main

    overrides, run_dir = tiny_run
    assert train_main(None, overrides + ["actor.fused_loss=off", "trainer.total_steps=2",
                                         "trainer.val_before_train=false"]) == 0
    rows = [r for r in _rows(run_dir) if "actor/pg_loss" in r]
    assert len(rows) == 2 and all(r["actor/update_ok"] == 1.0 for r in rows)
    assert json.loads((run_dir / "plan.json").read_text())["loss_backend"] == "torch"
