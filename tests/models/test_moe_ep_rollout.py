"""The native engine under expert parallelism (gloo, DP=2 x EP=2): when one rank's
responses end steps before the other's, it keeps stepping with the group (the alltoall
needs every EP rank in every forward), so nothing hangs and the greedy tokens equal EP=1."""
import types

import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc

PAD = 0


def _prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 90, (4, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :1] = 0
    return ids, mask


def _generate(rank, world, hf_dir, ep, eos, out, max_new=8):
    from megatron_rl.data.batch import Batch
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams

    init_distributed(ep=ep, timeout_s=60)
    engine = NativeEngine(load_checkpoint(hf_dir, layer_spec="local"),
                          types.SimpleNamespace(eos_token_id=eos, pad_token_id=PAD))
    ids, mask = _prompts()
    results = {}
    for share in range(2):                      # the rows DP rank `share` generates at EP=2 (1 chunk each)
        if world > 1 and share != rank:
            continue
        rows = [0] if share == 0 else [1, 2, 3]
        batch = Batch({"prompt_ids": ids[rows], "prompt_mask": mask[rows]}, [{"uid": str(i)} for i in rows])
        res = engine.generate(batch, SamplingParams(n=1, max_new_tokens=max_new, greedy=True))
        results[share] = (res["response_ids"], res["response_mask"])
    torch.save(results, f"{out}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_ep2_rollout_with_uneven_lengths_matches_ep1(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", tie=False)
    # EP=1 without a reachable EOS, then EOS := the token rank 0's first row emits second:
    # rank 0 stops after 2 steps, rank 1 runs on.
    _generate(0, 1, hf, 1, 95, str(tmp_path / "free"))
    free = torch.load(f"{tmp_path}/free.0")
    eos = int(free[0][0][0, 1])
    _generate(0, 1, hf, 1, eos, str(tmp_path / "ep1"))
    ref = torch.load(f"{tmp_path}/ep1.0")
    len0, len1 = ref[0][1].sum(-1), ref[1][1].sum(-1)
    assert len0.max() < len1.max(), (len0, len1)          # the two ranks finish at different steps
    run_multiproc(_generate, 2, (hf, 2, eos, str(tmp_path / "ep2")))
    for rank in range(2):
        got = torch.load(f"{tmp_path}/ep2.{rank}")[rank]
        assert torch.equal(got[0], ref[rank][0]) and torch.equal(got[1], ref[rank][1]), rank
