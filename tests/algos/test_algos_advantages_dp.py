"""Batch-wide whitening (REINFORCE++, GAE) under data parallelism: each DP rank holds part of
the batch, and the advantages equal the single-process ones on the whole batch (2 gloo
processes)."""
import pytest
import torch

from tests.helpers import run_multiproc


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    mask[4, 1:] = 0                       # ranks hold different numbers of valid tokens
    rewards = torch.randn(6, 5, generator=g) * mask
    values = torch.randn(6, 5, generator=g) * mask
    return rewards, values, mask


def _whiten(rank, world, out):
    from megatron_rl.algos import get_advantage_estimator
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.data_parallel import dp_group

    init_distributed()
    rewards, values, mask = _batch()
    rows = slice(0, 6) if world == 1 else slice(3 * rank, 3 * rank + 3)
    res = {}
    for name in ("reinforce_plus_plus", "gae"):
        adv, _ = get_advantage_estimator(name)(token_rewards=rewards[rows], response_mask=mask[rows],
                                               values=values[rows], gamma=0.9, lam=0.95, dp_group=dp_group())
        res[name] = adv
    torch.save(res, f"{out}.{world}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_dp2_whitening_equals_the_whole_batch(tmp_path):
    out = str(tmp_path / "adv")
    run_multiproc(_whiten, 1, (out,))
    run_multiproc(_whiten, 2, (out,))
    whole = torch.load(f"{out}.1.0")
    parts = [torch.load(f"{out}.2.{r}") for r in (0, 1)]
    for name in whole:
        joined = torch.cat([p[name] for p in parts])
        assert (joined - whole[name]).abs().max() < 1e-5, name
        assert whole[name].abs().sum() > 0
