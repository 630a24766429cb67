"""Data parallelism: each DP rank keeps its share of whole prompts, and metrics/validation
scores are joined over DP (two gloo processes)."""
import pytest
import torch

from tests.helpers import run_multiproc


def _dp_worker(rank, world, out):
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.data_parallel import dp_mean, reduce_metrics, shard_for_dp

    init_distributed(tp=1, pp=1)
    shard = shard_for_dp(list(range(8)))
    with pytest.raises(ValueError, match="data.train_batch_size=7 must be a multiple"):
        shard_for_dp(list(range(7)))
    metrics = reduce_metrics({"reward/mean": float(rank), "reward/max": float(rank), "reward/min": float(rank),
                              "timing/rollout": 10.0 + rank})
    val = dp_mean([1.0, 0.0, 1.0] if rank == 0 else [0.0])
    torch.save({"shard": shard, "metrics": metrics, "val": val}, f"{out}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_dp_shards_and_reduces(tmp_path):
    out = str(tmp_path / "dp")
    run_multiproc(_dp_worker, 2, (out,))
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["shard"] == [0, 1, 2, 3] and r1["shard"] == [4, 5, 6, 7]
    for r in (r0, r1):
        assert r["metrics"]["reward/mean"] == 0.5
        assert r["metrics"]["reward/max"] == 1.0 and r["metrics"]["reward/min"] == 0.0
        assert r["val"] == pytest.approx(0.5)   # 2 of 4 prompts over both ranks
    assert r0["metrics"]["timing/rollout"] == 10.0 and r1["metrics"]["timing/rollout"] == 11.0


def test_single_process_is_identity():
    from megatron_rl.parallel.data_parallel import dp_mean, reduce_metrics, shard_for_dp

    assert shard_for_dp([3, 1, 2]) == [3, 1, 2]
    assert reduce_metrics({"a": 1.0}) == {"a": 1.0}
    assert dp_mean([1.0, 2.0]) == 1.5


# --- end to end: adaptive KL-in-reward at DP=2, the ranks drawing different data sources ----------
KL_INIT, KL_TARGET, KL_HORIZON = 0.1, 0.025, 10.0


def _dp_kl_train(rank, world, overrides, out):
    from megatron_rl.algos.kl import AdaptiveKLController
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.main import build_trainer

    class Recording(AdaptiveKLController):
        def update(self, current_kl, n_steps):
            self.calls.append((current_kl, n_steps))
            super().update(current_kl, n_steps)

    trainer = build_trainer(load_experiment_config(None, overrides))
    trainer.kl_ctrl = Recording(KL_INIT, target_kl=KL_TARGET, horizon=KL_HORIZON)
    trainer.kl_ctrl.calls = []
    try:
        trainer.fit()
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    torch.save({"value": trainer.kl_ctrl.value, "calls": trainer.kl_ctrl.calls}, f"{out}.{rank}")


@pytest.mark.multiproc
def test_dp_adaptive_kl_coefficient_is_the_global_batch_one(tiny_run, tmp_path):
    """Rank 0 draws only source "a", rank 1 "a" and "b" (unshuffled rows a, a, a, b): the run
    neither hangs nor drops a source, and both ranks' KL controllers take the step a DP=1
    controller takes on the global batch's KL (8 sequences a step)."""
    import json

    from megatron_rl.data.writers import write_jsonl

    overrides, run_dir = tiny_run
    qs = ["what is two plus two ?", "what is one plus three ?", "give the number four", "what is three plus one ?"]
    train = tmp_path / "sources.jsonl"
    write_jsonl(train, [{"prompt": qs[i % 4], "ground_truth": "4", "data_source": "b" if i % 4 == 3 else "a"}
                        for i in range(16)])
    (tmp_path / "length.py").write_text("def length(response, sample, **kw):\n"
                                        "    return len(response.split()) / 5.0\n")
    keep = [o for o in overrides if not o.startswith(("data.train_files", "data.train_batch_size", "reward."))]
    overrides = keep + [
        f"data.train_files=[{train}]", "data.train_batch_size=4", "data.shuffle=false", "reward.name=length",
        f"reward.custom_functions={{length: '{tmp_path / 'length.py'}:length'}}", "reward.num_workers=0",
        "algos.use_kl_in_reward=true", "algos.kl_in_reward_kind=low_var_kl", "algos.kl_ctrl=adaptive",
        f"algos.kl_coef={KL_INIT}", f"algos.target_kl={KL_TARGET}", f"algos.kl_horizon={KL_HORIZON}", "trainer.val_before_train=false"]
    out = str(tmp_path / "kl")
    run_multiproc(_dp_kl_train, 2, (overrides, out))
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")

    assert r0["value"] == r1["value"] and r0["calls"] == r1["calls"]
    assert [n for _, n in r0["calls"]] == [8, 8, 8]           # the global batch, not a rank's 4
    assert any(kl > 0 for kl, _ in r0["calls"][1:])           # the actor moved away from the reference
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2, 3]
    beta = KL_INIT                                              # a DP=1 controller fed the logged global KL
    for row, (kl, _) in zip(steps, r0["calls"]):
        assert row["reward/kl_coef"] == pytest.approx(beta, abs=1e-9)
        assert row["reward/kl"] == pytest.approx(kl, abs=1e-9)
        assert "reward/a/mean" in row and "reward/b/mean" in row
        beta *= 1.0 + min(max(kl / KL_TARGET - 1.0, -0.2), 0.2) * 8 / KL_HORIZON
    assert r0["value"] == pytest.approx(beta, abs=1e-6) and abs(beta - KL_INIT) > 1e-3
