"""GAD end to end on a tiny offline task whose teacher always answers "yes yes yes":
the discriminator learns the signature during warm-up, then the student climbs the
discriminator's score and picks up the signature; SFT warm-up, missing teacher
responses and checkpoint resume."""
import pytest

from megatron_rl.data.readers import DataError
from tests.gad.conftest import run_gad, write_gad_data


def mean(xs):
    return sum(xs) / len(xs)


def test_discriminator_learns_then_student_climbs_its_score(gad_run):
    overrides, _ = gad_run
    rows = run_gad(overrides + ["trainer.total_steps=14", "trainer.critic_warmup=3", "gad.warmup_student=frozen",
                                "gad.freeze_discriminator_after=3"])
    by_step = {r["step"]: r for r in rows}
    warm = [by_step[s] for s in (1, 2, 3)]
    assert all(r["gad/warmup"] == 1.0 and "actor/pg_loss" not in r for r in warm)
    assert warm[-1]["critic/d_acc"] > 0.8 and warm[-1]["critic/d_loss"] < warm[0]["critic/d_loss"]
    gad = [by_step[s] for s in range(4, 15)]
    assert all("actor/pg_loss" in r for r in gad)
    early, late = gad[:3], gad[-4:]
    score = [mean([r["critic/student_value_mean"] for r in x]) for x in (early, late)]
    signature = [mean([r["gad/rule_score"] for r in x]) for x in (early, late)]
    assert score[1] > score[0] + 0.3, score
    assert signature[1] > signature[0] + 0.1, signature


def test_sft_warmup_lowers_teacher_nll(gad_run):
    overrides, _ = gad_run
    rows = run_gad(overrides + ["trainer.total_steps=3", "trainer.critic_warmup=3", "gad.warmup_student=sft"])
    nll = [r["actor/sft_loss"] for r in rows if r["step"] >= 1]
    assert len(nll) == 3 and nll[-1] < nll[0] - 0.1, nll


def test_missing_teacher_response_is_an_error_or_skipped(gad_run, tmp_path):
    overrides, _ = gad_run
    write_gad_data(tmp_path / "data", missing_line=5)
    base = overrides + ["trainer.total_steps=4", "trainer.critic_warmup=4", "gad.warmup_student=frozen"]
    with pytest.raises(DataError, match=r"train.jsonl:5.*answer"):
        run_gad(base + ["data.shuffle=false"])
    rows = run_gad(base + ["gad.skip_missing_teacher=true", f"logging.run_dir={tmp_path / 'skip'}"])
    assert rows[-1]["gad/skipped_no_teacher"] == 1.0


def test_resume_restores_discriminator(gad_run, tmp_path):
    overrides, run_dir = gad_run
    common = overrides + ["trainer.critic_warmup=1", "trainer.save_every=1", "trainer.resume=auto"]
    full = {r["step"]: r for r in run_gad(common + ["trainer.total_steps=3"])}
    part = [o for o in common if not o.startswith("logging.run_dir")] + [f"logging.run_dir={tmp_path / 'r'}"]
    run_gad(part + ["trainer.total_steps=2"])
    assert (tmp_path / "r" / "checkpoints" / "step_000002" / "discriminator" / "megatron_rl.json").exists()
    resumed = {r["step"]: r for r in run_gad(part + ["trainer.total_steps=3"])}
    for key in ("critic/d_loss", "critic/student_value_mean", "critic/teacher_value_mean", "actor/pg_loss"):
        assert resumed[3][key] == pytest.approx(full[3][key], rel=1e-5, abs=1e-6), key
