"""Micro-batch shares of the mini-batch loss: token counts, or weight sums when token
weights are applied to the loss mask (the token-mean denominator is then the weight sum)."""
import pytest
import torch

from megatron_rl.trainer.update_steps import microbatch_weights as _microbatch_weights


def _mbs():
    m1 = {"response_mask": torch.tensor([[1.0, 1.0, 0.0]]), "token_weights": torch.tensor([[0.5, 0.25, 9.0]])}
    m2 = {"response_mask": torch.tensor([[1.0, 1.0, 1.0]]), "token_weights": torch.tensor([[1.0, 1.0, 0.25]])}
    return [m1, m2]


def test_token_mean_shares_follow_counts_for_pg():
    assert _microbatch_weights(_mbs(), "token-mean", "pg") == pytest.approx([2 / 5, 3 / 5])


def test_token_mean_shares_follow_weight_sums_for_mask():
    assert _microbatch_weights(_mbs(), "token-mean", "mask") == pytest.approx([0.75 / 3.0, 2.25 / 3.0])


def test_seq_mean_shares_ignore_weights():
    assert _microbatch_weights(_mbs(), "seq-mean-token-mean", "mask") == pytest.approx([0.5, 0.5])
