"""`megatron-rl train` at PP=2 x VPP=2 (two gloo processes, an 8-layer tiny Llama): the
recipe builds chunk lists, the native engine generates over them, the interleaved schedule
trains, and the run checkpoints and resumes; its first step's losses equal PP=1's."""
import json

import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc

STEPS = ["trainer.total_steps=2", "trainer.val_before_train=false", "trainer.save_every=1"]


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _train(rank, world, overrides):
    from megatron_rl.trainer.main import train_main
    assert train_main(None, overrides) == 0


@pytest.mark.multiproc
def test_vpp_trains_resumes_and_matches_pp1(tiny_run, tmp_path):
    overrides, run_dir = tiny_run
    hf = make_tiny_hf(tmp_path / "model8", "llama", tie=True, num_hidden_layers=8)
    import shutil
    for f in (run_dir.parent / "model").iterdir():         # the tiny_run tokenizer files
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, hf)
    base = [o for o in overrides if not o.startswith("model.path=")] + [f"model.path={hf}"] + STEPS
    pp1, vpp = tmp_path / "pp1", tmp_path / "vpp"
    run_multiproc(_train, 1, (base + [f"logging.run_dir={pp1}"],))
    run_multiproc(_train, 2, (base + ["model.pp=2", "model.vpp=2", f"logging.run_dir={vpp}"],))
    a, b = _rows(pp1), _rows(vpp)
    assert [r["step"] for r in b] == [1, 2]
    for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "reward/mean"):
        assert abs(a[0][k] - b[0][k]) < 1e-5, k                # same rollout, same update at step 1
    plan = json.loads((vpp / "plan.json").read_text())
    assert plan["layout"]["vpp"] == 2 and plan["layout"]["pp"] == 2
    shutil.rmtree(vpp / "checkpoints" / "step_000002")             # as if the run died after step 1
    (vpp / "checkpoints" / "latest").write_text("step_000001")
    (vpp / "metrics.jsonl").unlink()
    run_multiproc(_train, 2, (base + ["model.pp=2", "model.vpp=2", f"logging.run_dir={vpp}"],))
    resumed = _rows(vpp)
    assert [r["step"] for r in resumed] == [2]
    assert abs(resumed[0]["actor/pg_loss"] - b[1]["actor/pg_loss"]) < 1e-5
    assert torch.isfinite(torch.tensor(resumed[0]["actor/grad_norm"]))
