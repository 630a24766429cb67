"""GRPO through `megatron-rl train` on a tiny random Qwen3-MoE at DP=2 x EP=2 (two gloo
processes): the first step's pg_loss and grad_norm equal DP=2 without expert parallelism
(the same rollout: the native engine decodes in lockstep), and the MoE metrics
(`moe/aux_loss`, `moe/z_loss`, per-layer expert-load imbalance) are logged and agree."""
import json
import shutil

import pytest

from tests.helpers import make_tiny_hf, run_multiproc

ONE_STEP = ["trainer.total_steps=1", "trainer.val_before_train=false", "trainer.final_validation=false",
            "trainer.save_final=false", "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001"]


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _train(rank, world, overrides):
    from megatron_rl.trainer.main import train_main
    assert train_main(None, overrides) == 0


VARIED_REWARD = '''
def varied(response, sample, **kw):
    """Differs between the random model's responses, so GRPO advantages are not all zero."""
    return (sum(map(ord, response)) % 7) / 6.0
'''


def moe_overrides(tiny_run, tmp_path) -> list[str]:
    overrides, run_dir = tiny_run
    (tmp_path / "varied.py").write_text(VARIED_REWARD)
    overrides = [o for o in overrides if not o.startswith("reward.")] + [
        "reward.name=varied", f"reward.custom_functions={{varied: '{tmp_path / 'varied.py'}:varied'}}",
        "reward.num_workers=0"]
    hf = make_tiny_hf(tmp_path / "moe", "qwen3_moe", tie=False)
    for f in (run_dir.parent / "model").iterdir():         # the tiny_run tokenizer files
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, hf)
    return [o for o in overrides if not o.startswith("model.path=")] + [f"model.path={hf}"] + ONE_STEP


@pytest.mark.multiproc
def test_grpo_at_ep2_matches_ep1_and_logs_moe_metrics(tiny_run, tmp_path):
    base = moe_overrides(tiny_run, tmp_path)
    ep1, ep2 = tmp_path / "ep1", tmp_path / "ep2"
    run_multiproc(_train, 2, (base + [f"logging.run_dir={ep1}"],))
    run_multiproc(_train, 2, (base + ["model.ep=2", f"logging.run_dir={ep2}"],))
    a, b = _rows(ep1)[0], _rows(ep2)[0]
    assert json.loads((ep2 / "plan.json").read_text())["layout"]["ep"] == 2
    for k in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "moe/aux_loss", "moe/z_loss"):
        assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    assert abs(a["actor/pg_loss"]) > 1e-4 and a["moe/aux_loss"] > 0 and a["moe/z_loss"] > 0
    layers = sorted(k for k in b if k.startswith("moe/load_imbalance/layer_"))
    assert layers == ["moe/load_imbalance/layer_0", "moe/load_imbalance/layer_2", "moe/load_imbalance/layer_3"]
    for k in layers:                                       # max / mean tokens per expert, 4 experts
        assert 1.0 <= b[k] <= 4.0 and abs(a[k] - b[k]) < 1e-6, k
