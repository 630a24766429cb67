import json

import pytest
import torch

from megatron_rl.logging import LoggingConfig, MetricsLogger, plot_run, read_metrics, timer


def cfg(tmp_path, sinks=("jsonl",), **kw):
    return LoggingConfig(sinks=list(sinks), run_dir=str(tmp_path / "run"), **kw)


def lines(tmp_path):
    return [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_writes_one_object_per_step_with_floats(tmp_path):
    with MetricsLogger(cfg(tmp_path)) as logger:
        logger.log({"reward/mean": torch.tensor(0.5), "actor/pg_loss": 1}, step=1)
        logger.log({"reward/mean": 0.75}, step=2)
    recs = lines(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["reward/mean"] == 0.5 and recs[0]["actor/pg_loss"] == 1.0 and recs[1]["reward/mean"] == 0.75


def test_jsonl_appends_when_a_run_resumes(tmp_path):
    with MetricsLogger(cfg(tmp_path)) as logger:
        logger.log({"reward/mean": 0.1}, step=1)
    with MetricsLogger(cfg(tmp_path), start_step=1) as logger:
        logger.log({"reward/mean": 0.2}, step=2)
    assert [r["step"] for r in lines(tmp_path)] == [1, 2]


def test_partial_last_line_of_killed_run_is_skipped_on_read(tmp_path):
    with MetricsLogger(cfg(tmp_path)) as logger:
        logger.log({"reward/mean": 0.1}, step=1)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')
    with MetricsLogger(cfg(tmp_path)) as logger:
        logger.log({"reward/mean": 0.3}, step=2)
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(tmp_path / "run")] == [(1, 0.1), (2, 0.3)]


def test_timer_records_timing_phase_with_next_log(tmp_path):
    with MetricsLogger(cfg(tmp_path)) as logger:
        with logger.timer("rollout"):
            pass
        with logger.timer("rollout"):
            pass
        written = logger.log({}, step=1)
        assert "timing/rollout" in written and written["timing/rollout"] >= 0.0
        assert "timing/rollout" not in logger.log({}, step=2)


def test_free_timer_accumulates_into_dict():
    out = {}
    with timer("update", out):
        pass
    assert list(out) == ["timing/update"]


def test_only_rank_zero_writes(tmp_path):
    with MetricsLogger(cfg(tmp_path), rank=1) as logger:
        logger.log({"reward/mean": 1.0}, step=1)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_non_numeric_metric_is_dropped(tmp_path):
    with MetricsLogger(cfg(tmp_path)) as logger:
        assert logger.log({"reward/mean": 1.0, "note": "hi"}, step=1) == {"reward/mean": 1.0}


def test_console_line_shows_configured_keys(tmp_path, capsys):
    c = cfg(tmp_path, sinks=["console"], progress_bar=False, console_keys=["reward/mean", "actor/pg_loss"])
    with MetricsLogger(c, total_steps=8) as logger:
        logger.log({"reward/mean": 0.123456, "actor/pg_loss": -0.5, "other/x": 3}, step=3)
    assert capsys.readouterr().out.strip() == "step 3/8 | reward/mean 0.1235 | actor/pg_loss -0.5"


def test_console_with_progress_bar_runs(tmp_path):
    with MetricsLogger(cfg(tmp_path, sinks=["console"]), total_steps=2) as logger:
        logger.log({"reward/mean": 0.5}, step=1)
        logger.log({"reward/mean": 0.6}, step=2)
        assert logger.sinks[0].bar.n == 2


def test_tensorboard_sink_writes_event_file(tmp_path):
    with MetricsLogger(cfg(tmp_path, sinks=["tensorboard"])) as logger:
        logger.log({"reward/mean": 0.5}, step=1)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_missing_gives_clear_error(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)      # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'megatron-rl\[wandb\]'"):
        MetricsLogger(cfg(tmp_path, sinks=["wandb"]))


def test_unknown_sink_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown logging sink 'csv'"):
        MetricsLogger(cfg(tmp_path, sinks=["csv"]))


def test_plot_run_writes_png(tmp_path):
    with MetricsLogger(cfg(tmp_path)) as logger:
        for step in range(1, 6):
            m = {"reward/mean": step / 5, "actor/kl_loss": 0.01 * step}
            if step % 2 == 0:
                m["val/reward"] = step / 6
            logger.log(m, step=step)
    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "metrics.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_without_kl_and_custom_path(tmp_path):
    with MetricsLogger(cfg(tmp_path)) as logger:
        logger.log({"reward/mean": 0.1}, step=1)
    out = plot_run(tmp_path / "run", tmp_path / "elsewhere" / "p.png")
    assert out.is_file() and out.stat().st_size > 1000


def test_plot_run_without_metrics_file_names_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
        plot_run(tmp_path)
