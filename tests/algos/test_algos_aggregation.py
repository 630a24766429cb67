"""Loss aggregation modes against hand-computed values."""
import pytest
import torch

from megatron_rl.algos import agg_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 21 / 6),
    ("seq-mean-token-sum", (10 + 11) / 2),           # the all-masked row is excluded
    ("seq-mean-token-mean", (2.5 + 5.5) / 2),
    ("seq-mean-token-sum-norm", (10 / 4 + 11 / 4) / 2),
])
def test_modes(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected)


def test_dr_grpo_norm_uses_given_constant():
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_len=8).item() == pytest.approx((10 + 11) / 16)


def test_fractional_mask_weights_numerator_and_denominator():
    loss = torch.tensor([[2.0, 4.0]])
    assert agg_loss(loss, torch.tensor([[0.5, 1.0]]), "token-mean").item() == pytest.approx(5 / 1.5)


def test_integer_mask_is_promoted_to_float():
    assert agg_loss(LOSS, MASK.long(), "token-mean").item() == pytest.approx(21 / 6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_all_masked_batch_gives_zero_loss_and_zero_gradient(mode):
    loss = torch.ones(2, 3, requires_grad=True)
    out = agg_loss(loss, torch.zeros(2, 3), mode)
    out.backward()
    assert out.item() == 0.0 and torch.equal(loss.grad, torch.zeros(2, 3))


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        agg_loss(LOSS, MASK, "seq-mean")


def test_shape_mismatch_names_tensors():
    with pytest.raises(ValueError, match="'mask' has shape"):
        agg_loss(LOSS, MASK[:, :2], "token-mean")
