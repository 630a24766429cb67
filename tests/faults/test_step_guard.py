"""Step guard: an optimizer step with a non-finite loss is skipped on every rank (weights,
optimizer state and LR schedule untouched), counted in `actor/skipped_steps`, and
`trainer.max_bad_steps` of them in a row stop the run with a message naming the key."""
import json

import pytest
import torch

from megatron_rl.trainer.checkpoint import read_policy_state
from megatron_rl.trainer.main import train_main
from megatron_rl.trainer.update_steps import BadStepGuard, NonFiniteStepsError


def rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_nan_loss_step_is_skipped_counted_and_leaves_state_untouched(tiny_run, monkeypatch):
    overrides, run_dir = tiny_run
    monkeypatch.setenv("MEGATRON_RL_FAULT_NAN", "2")        # the 2nd optimizer step's loss is NaN
    assert train_main(None, overrides + ["trainer.save_every=1", "trainer.keep_last=0",
                                         "trainer.val_before_train=false"]) == 0
    m = rows(run_dir)
    assert [m[s]["actor/skipped_steps"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert m[2]["actor/update_ok"] == 0.0 and m[3]["actor/update_ok"] == 1.0
    ck = run_dir / "checkpoints"
    s1, s2, s3 = (read_policy_state(ck / f"step_00000{s}") for s in (1, 2, 3))
    assert s2["scheduler"] == s1["scheduler"] != s3["scheduler"]          # no LR-schedule step either
    state = [k for k in s1["tensors"] if k.startswith("optimizer.state.")]      # exp_avg / exp_avg_sq
    for k in state:                                                             # Adam state untouched
        assert torch.equal(s2["tensors"][k], s1["tensors"][k]), k
    adam_step = [float(s["optimizer"]["state"]["common_step"]) for s in (s1, s2, s3)]
    assert state and adam_step == [1.0, 1.0, 2.0]
    for f in (ck / "step_000001" / "model").glob("*.distcp"):                 # the weights, byte for byte
        assert f.read_bytes() == (ck / "step_000002" / "model" / f.name).read_bytes(), f.name


def test_max_bad_steps_in_a_row_stops_the_run(tiny_run, monkeypatch):
    overrides, _ = tiny_run
    monkeypatch.setenv("MEGATRON_RL_FAULT_NAN", "1,2")
    with pytest.raises(NonFiniteStepsError, match=r"trainer.max_bad_steps=2: 2 actor optimizer steps in a row"):
        train_main(None, overrides + ["trainer.max_bad_steps=2", "trainer.val_before_train=false"])


def test_bad_step_guard_counts_only_unbroken_runs():
    g = BadStepGuard(max_bad_steps=3)
    for skipped, total in ((2, 2), (1, 2), (2, 2)):        # a step with one good update resets the run
        g.update({"actor/skipped_steps": skipped, "actor/optimizer_steps": total}, step=1)
    assert g.in_a_row == 2
    with pytest.raises(NonFiniteStepsError):
        g.update({"actor/skipped_steps": 1, "actor/optimizer_steps": 1}, step=4)


def test_max_bad_steps_must_be_positive():
    from megatron_rl.config.schema import TrainerConfig
    with pytest.raises(ValueError, match="trainer.max_bad_steps must be >= 1"):
        TrainerConfig(max_bad_steps=0)
