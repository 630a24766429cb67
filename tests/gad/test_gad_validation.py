"""GAD validation: besides the rule reward (`val/reward`) the discriminator's view of
greedy student responses on the validation prompts: `val/d_score` always,
`val/d_teacher_score` and `val/d_acc` where the prompts carry teacher responses."""
import json

import pytest

from tests.gad.conftest import write_gad_data


def build(overrides):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.gad import build_gad_trainer

    return build_gad_trainer(load_experiment_config(None, overrides))


def rows_of(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(x) for x in f]


def test_val_d_scores_are_logged_before_and_after_and_d_learns_the_teacher(gad_run):
    overrides, run_dir = gad_run
    trainer = build(overrides + ["trainer.total_steps=3", "trainer.critic_warmup=3", "gad.warmup_student=frozen",
                                 "trainer.val_before_train=true"])
    try:
        trainer.fit()
        direct = trainer.validate_discriminator()
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    rows = rows_of(run_dir)
    before = next(r for r in rows if r["step"] == 0 and "val/d_score" in r)
    after = next(r for r in rows if r["step"] == 3 and "val/d_score" in r)
    assert {"val/d_score", "val/d_teacher_score", "val/d_acc"} <= set(after)
    assert any(r["step"] == 3 and "val/reward" in r for r in rows)       # the rule reward stays
    # warm-up teaches D the teacher's signature: held-out teacher responses end up above the student's
    assert after["val/d_acc"] == 1.0
    gap = [r["val/d_teacher_score"] - r["val/d_score"] for r in (before, after)]
    assert gap[1] > gap[0] + 0.5, gap
    # the logged numbers are those of the final weights (nothing trains after the last validation)
    assert direct["val/d_score"] == pytest.approx(after["val/d_score"], rel=1e-5, abs=1e-6)


def test_val_without_teacher_responses_reports_only_d_score(gad_run, tmp_path):
    overrides, _ = gad_run
    data = tmp_path / "data"
    write_gad_data(data)
    (data / "val.jsonl").write_text('{"prompt": "what is two plus two ?"}\n' * 3)
    trainer = build(overrides + ["trainer.total_steps=1", "trainer.critic_warmup=1", "gad.warmup_student=frozen"])
    try:
        out = trainer.validate_discriminator()
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    assert set(out) == {"val/d_score"}
    assert isinstance(out["val/d_score"], float)
