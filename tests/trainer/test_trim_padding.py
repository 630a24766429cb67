"""Padded log-prob/update micro-batches cut to the columns some row uses (trainer/microbatch.py
`trim_padding`): log-probs, losses and gradients equal the untrimmed ones (float32, CPU)."""
import pytest
import torch

from tests.trainer.test_offload import _actor, _update, hf  # noqa: F401  (module fixture)
from tests.trainer.test_packed_training import ragged_batch


def test_trim_drops_all_pad_columns_and_keeps_the_scored_ones():
    from megatron_rl.trainer.microbatch import make_microbatches, trim_padding

    mbs = make_microbatches(ragged_batch(), 2)          # rows (8, 30), (5+3, 12+3), (7+4, 25+7) real tokens
    shapes = [tuple(trim_padding(mb)["input_ids"].shape) for mb in mbs]
    assert shapes == [(2, 38), (2, 5 + 12), (2, 7 + 25)]
    t = trim_padding(mbs[1])
    assert int(t["prompt_len"]) == 5 and t["labels"].shape == t["advantages"].shape == (2, 12)
    assert t["response_mask"].sum() == mbs[1]["response_mask"].sum() and int(t["response_width"]) == 30


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_trimmed_logprobs_loss_and_grads_equal_untrimmed(hf, agg):  # noqa: F811
    from megatron_rl.algos.config import AlgosConfig

    batch = ragged_batch()
    trim, full = _actor(hf, "float32"), _actor(hf, "float32")
    full.trim_padding = False
    lp_t, ent_t = trim.compute_logprobs(batch, with_entropy=True)
    lp_f, ent_f = full.compute_logprobs(batch, with_entropy=True)
    m = batch["response_mask"]                           # entropy at pad columns is unspecified (0 when cut)
    assert torch.allclose(lp_t, lp_f, atol=1e-6, rtol=0) and torch.allclose(ent_t * m, ent_f * m, atol=1e-6, rtol=0)
    algos = AlgosConfig(loss_agg_mode=agg)
    m_t = trim.update(batch, algos, mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    m_f = full.update(batch, algos, mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    for k in m_f[0]:
        assert m_t[0][k] == pytest.approx(m_f[0][k], abs=1e-6), k
    grads = [(n, p.main_grad, q.main_grad) for (n, p), q in
             zip(trim.ddp.module.named_parameters(), full.ddp.module.parameters())]
    assert any(g.abs().max() > 0 for _, g, _ in grads)
    for n, a, b in grads:
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n
