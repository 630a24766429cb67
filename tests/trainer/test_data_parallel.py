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
