"""Packed micro-batches give the padded batch's log-probs; budgets and DP balance hold."""
import pytest
import torch

from megatron_rl.models.packing import (balance_across_dp, pack_sequences, packed_microbatches,
                                        plan_microbatches)
from tests.helpers import make_tiny_hf


def _rl_batch(seed=0, b=5, prompt=6, response=9):
    """[left-padded prompt | right-padded response] rows with assorted lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (b, prompt + response), generator=g)
    am = torch.ones_like(ids)
    for r in range(b):
        am[r, :int(torch.randint(0, prompt - 1, (1,), generator=g))] = 0
        am[r, prompt + int(torch.randint(1, response + 1, (1,), generator=g)):] = 0
    return ids, am


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rl.parallel import init_distributed
    init_distributed()
    return make_tiny_hf(tmp_path_factory.mktemp("speed_pack") / "hf", "qwen2", tie=False)


def _padded_logprobs(model, ids, am):
    from megatron_rl.models.forward import gpt_forward
    logits = gpt_forward(model, ids, am)
    return torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("spec", ["local", "sdpa"])
def test_packed_logprobs_match_padded(hf_dir, spec):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.packing import packed_forward
    model = load_checkpoint(hf_dir, layer_spec=spec).eval()
    ids, am = _rl_batch()
    with torch.no_grad():
        ref = _padded_logprobs(model, ids, am)
        got = torch.zeros(ids.shape)
        for pk in packed_microbatches(ids, am, max_tokens_per_microbatch=24, pad_to_multiple_of=8):
            logits = packed_forward(model, pk)[0]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, pk.next_token_labels()[0, :, None])[:, 0]
            got += pk.unpack(lp)
    scored = (am[:, :-1] * am[:, 1:]).bool()
    assert scored.sum() > 20
    assert (got[:, :-1] - ref)[scored].abs().max().item() < 1e-5


def test_pack_positions_restart_and_roundtrip():
    ids, am = _rl_batch(b=3)
    pk = pack_sequences(ids, am, pad_to=40)
    lengths = am.sum(-1).tolist()
    assert pk.cu_seqlens.tolist()[:4] == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert pk.cu_seqlens.tolist()[-1] == pk.num_tokens == 40
    assert pk.num_real_tokens == sum(lengths)
    first = pk.position_ids[0, pk.cu_seqlens[:-1].long()]
    assert first.tolist() == [0] * len(first)
    assert torch.equal(pk.unpack(pk.input_ids) * am, ids * am)
    assert torch.equal(pk.unpack(pk.pack(am.float())), am.float())


def test_block_mask_confines_attention_to_each_sequence():
    ids, am = _rl_batch(b=2)
    pk = pack_sequences(ids, am)
    n0 = int(am[0].sum())
    keep = ~pk.attention_mask()[0, 0]
    assert not keep[n0:, :n0].any()                      # second sequence never sees the first
    assert keep[n0:, n0:].equal(torch.ones_like(keep[n0:, n0:]).tril())


def test_microbatches_respect_token_budget():
    lengths = [900, 50, 3000, 1200, 400, 2500, 100, 1800, 700, 60]
    bins = plan_microbatches(lengths, 4096)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 4096
    assert len(bins) == 3                               # total 10710 tokens: 3 bins is optimal


def test_microbatch_longer_than_budget_is_an_error():
    with pytest.raises(ValueError, match="exceed max_tokens_per_microbatch=100"):
        plan_microbatches([50, 150], 100)


def test_balance_across_dp_equalises_token_sums():
    torch.manual_seed(0)
    lengths = (torch.distributions.LogNormal(6.0, 1.0).sample((64,)).clamp(max=4096).long() + 200).tolist()
    parts = balance_across_dp(lengths, 4)
    sums = [sum(lengths[i] for i in p) for p in parts]
    assert sorted(i for p in parts for i in p) == list(range(64))
    assert max(sums) / min(sums) < 1.02


def test_balance_across_dp_equal_counts():
    parts = balance_across_dp([4000, 3000, 100, 90, 80, 70, 60, 50], 2, equal_counts=True)
    assert [len(p) for p in parts] == [4, 4]
