"""Clipped value loss and entropy from logits."""
import math

import pytest
import torch

from megatron_rl.algos import entropy_from_logits, value_loss


def test_value_loss_takes_max_of_clipped_and_unclipped():
    values = torch.tensor([[1.0, 2.0, 9.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 2.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, clipfrac = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: clipped V = 0.7 -> (1.3)^2 = 1.69 > 1 ; token 1: 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_value_loss_without_clipping_is_half_mse():
    values = torch.tensor([[1.0, 2.0]])
    loss, clipfrac = value_loss(values, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), clip_range=None)
    assert loss.item() == pytest.approx(0.5 * (1 + 4) / 2) and clipfrac.item() == 0.0


def test_value_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(2, 4, dtype=torch.float64, generator=g)
    v = (old + torch.randn(2, 4, dtype=torch.float64, generator=g) * 0.5).requires_grad_(True)
    ret = torch.randn(2, 4, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: value_loss(x, old, ret, mask, 0.2)[0], (v,))


def test_value_loss_nan_returns_names_argument():
    with pytest.raises(ValueError, match="'returns'"):
        value_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([[float("nan")]]), torch.ones(1, 1), 0.2)


def test_entropy_of_uniform_is_log_vocab():
    assert entropy_from_logits(torch.zeros(2, 3, 4)).flatten().tolist() == pytest.approx([math.log(4)] * 6)


def test_entropy_matches_definition_and_is_stable_for_large_logits():
    logits = torch.randn(3, 7, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    assert entropy_from_logits(torch.tensor([1e4, 1e4, -1e4])).item() == pytest.approx(math.log(2))


def test_entropy_ignores_neg_inf_logits_with_finite_gradient():
    logits = torch.tensor([float("-inf"), 0.0, 0.0], requires_grad=True)
    ent = entropy_from_logits(logits)
    ent.backward()
    assert ent.item() == pytest.approx(math.log(2)) and torch.isfinite(logits.grad).all()


def test_entropy_gradcheck_float64():
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entropy_from_logits, (logits,))
