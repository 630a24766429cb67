"""Metrics and the KL controller under data parallelism (two gloo processes).

Ranks draw different data sources: rank 0 only "a", rank 1 "a" and "b". The reduced
metrics are those of the pooled samples (not means of rank means, not zero-filled), the
same on both ranks; the adaptive KL coefficient is the one a DP=1 run on the global
batch gets."""
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_rl.rewards import register_reward
from tests.helpers import run_multiproc

# (data_source, score) per rank; rank 1 has one more sample than rank 0
SAMPLES = {0: [("a", 1.0), ("a", 0.0), ("a", 0.5), ("a", 0.5)],
           1: [("a", 1.0), ("b", 0.2), ("b", 0.4), ("b", 0.6), ("b", 0.8)]}
# global batch of KL sequences: rows 0-1 on DP rank 0, rows 2-3 on rank 1
KL_STEPS, KL_ROWS, KL_LEN = 3, 4, 6
KL_TARGET, KL_HORIZON, KL_INIT = 0.14, 10.0, 0.05


@register_reward("test_dp_echo")
def _echo(response, sample):
    return float(response)


def _scored(rank):
    from megatron_rl.rewards import RewardConfig, RewardManager

    rows = SAMPLES[rank]
    samples = [{"uid": f"r{rank}:{i}", "data_source": src} for i, (src, _) in enumerate(rows)]
    with RewardManager(RewardConfig(name="test_dp_echo", num_workers=0)) as m:
        return m.score([str(s) for _, s in rows], samples).metrics


def kl_batch(step):
    """Rows whose per-token KL (kind k1: old - ref) is a constant per row: ~0 on DP rank 0's
    rows, ~2x the target on rank 1's, so a rank's own KL clips the other way than the mean."""
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(step)
    lengths = [6, 3, 5, 2]
    mask = torch.zeros(KL_ROWS, KL_LEN)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    per_row = torch.tensor([0.0, 0.01, 0.3, 0.25]) + 0.02 * step
    old = -torch.rand(KL_ROWS, KL_LEN, generator=g) * mask
    return Batch({"response_mask": mask, "old_logprob": old, "ref_logprob": old - per_row[:, None] * mask,
                  "token_rewards": torch.rand(KL_ROWS, KL_LEN, generator=g) * mask},
                 [{"uid": str(i), "group": i // 2} for i in range(KL_ROWS)])


def run_kl_controller(rows):
    """`phases.advantages` for KL_STEPS steps on `rows` of each step's global batch; the
    coefficient after each step and the logged `reward/kl`."""
    from megatron_rl.algos import kl_controller
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.trainer import phases

    algos = AlgosConfig(use_kl_in_reward=True, kl_in_reward_kind="k1", kl_ctrl="adaptive", kl_coef=KL_INIT,
                        target_kl=KL_TARGET, kl_horizon=KL_HORIZON)
    tr = SimpleNamespace(cfg=SimpleNamespace(algos=algos),
                         kl_ctrl=kl_controller("adaptive", KL_INIT, target_kl=KL_TARGET, horizon=KL_HORIZON))
    betas, kls = [], []
    for step in range(KL_STEPS):
        metrics = phases.advantages(tr, kl_batch(step).select(rows))
        betas.append(tr.kl_ctrl.value)
        kls.append(metrics["reward/kl"])
    return betas, kls


def _worker(rank, world, out):
    from megatron_rl.logging.values import MeanOver, Summed
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.data_parallel import reduce_metrics

    init_distributed(tp=1, pp=1)
    metrics = dict(_scored(rank))
    # keys on one rank only: a plain mean, a max, a min, a count
    metrics.update({"agent/tool_calls": 3.0} if rank else {"x/max": -2.0, "gad/skipped": Summed(2)})
    metrics.update({"y/min": 5.0} if rank else {})
    metrics["timing/rollout"] = 10.0 + rank
    reduced = reduce_metrics(metrics)
    with pytest.raises(ValueError, match="metric 'k' combines as mean / mean_over on different data-parallel"):
        reduce_metrics({"k": MeanOver(1.0, 2) if rank else 1.0})
    with pytest.raises(TypeError, match="metric 'note' is not a number on some data-parallel rank"):
        reduce_metrics({"note": "hi" if rank else 1.0})      # raised on both ranks: no hang
    betas, kls = run_kl_controller(range(2 * rank, 2 * rank + 2))
    torch.save({"reduced": reduced, "betas": betas, "kls": kls}, f"{out}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_metrics_and_kl_controller_over_data_parallel_ranks(tmp_path):
    out = str(tmp_path / "dp")
    run_multiproc(_worker, 2, (out,))
    r0, r1 = torch.load(f"{out}.0", weights_only=False), torch.load(f"{out}.1", weights_only=False)

    pooled = [s for rank in (0, 1) for _, s in SAMPLES[rank]]
    a = [s for rank in (0, 1) for src, s in SAMPLES[rank] if src == "a"]
    b = [s for rank in (0, 1) for src, s in SAMPLES[rank] if src == "b"]
    expected = {"reward/mean": np.mean(pooled), "reward/std": np.std(pooled), "reward/max": 1.0,
                "reward/min": 0.0, "reward/a/mean": np.mean(a), "reward/b/mean": np.mean(b),
                "reward/failures": 0.0, "agent/tool_calls": 3.0, "x/max": -2.0, "y/min": 5.0, "gad/skipped": 2.0}
    assert expected["reward/a/mean"] == pytest.approx(0.6)    # a mean of rank means would be 0.75
    assert expected["reward/b/mean"] == pytest.approx(0.5)    # zero-filled on rank 0 it would be 0.25
    for r in (r0, r1):
        got = {k: v for k, v in r["reduced"].items() if not k.startswith("timing/")}
        assert set(got) == set(expected) | {"reward/timeouts"}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
    assert r0["reduced"]["timing/rollout"] == 10.0 and r1["reduced"]["timing/rollout"] == 11.0

    # the KL coefficient: identical on both ranks, and a DP=1 controller's on the global batch
    ref_betas, ref_kls = run_kl_controller(range(KL_ROWS))
    assert r0["betas"] == r1["betas"] and r0["kls"] == r1["kls"]
    assert r0["betas"] == pytest.approx(ref_betas, abs=1e-9)
    assert r0["kls"] == pytest.approx(ref_kls, abs=1e-9)
    assert abs(ref_betas[-1] - KL_INIT) > 1e-3                 # the controller moved
    local_0, _ = run_kl_controller(range(0, 2))                # what rank 0 alone would have done
    assert abs(local_0[-1] - ref_betas[-1]) > 1e-3


def test_single_process_typed_metrics_are_plain_floats():
    from megatron_rl.logging.values import MeanOver, StdOver, Summed
    from megatron_rl.parallel.data_parallel import dp_mean_count, reduce_metrics

    out = reduce_metrics({"m": MeanOver.of([1.0, 2.0]), "s": StdOver.of([1.0, 3.0]), "n": Summed(2), "f": 0.5})
    assert out == {"m": 1.5, "s": 1.0, "n": 2.0, "f": 0.5}
    assert all(type(v) is float for v in out.values())
    assert dp_mean_count([1.0, 2.0, 6.0]) == (3.0, 3)
    m = pickle.loads(pickle.dumps(MeanOver(0.25, 4)))           # metrics travel between processes
    assert (type(m), float(m), m.count) == (MeanOver, 0.25, 4.0)
    s = pickle.loads(pickle.dumps(StdOver.of([1.0, 3.0])))
    assert (float(s), s.mean, s.count) == (1.0, 2.0, 2.0)
