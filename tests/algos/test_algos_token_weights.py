"""Token weights: alignment, the "pg" vs "mask" semantics, fractional weights surviving."""
import pytest
import torch

from megatron_rl.algos import actor_loss, align_token_weights, apply_token_weights, ppo_policy_loss

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
WEIGHTS = torch.tensor([[0.5, 2.0, 1.0], [0.25, 1.0, 1.0]])
ADV = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
ZERO = torch.zeros(2, 3)                                   # logprob == old_logprob: ratio 1, pg term = -A
REF = -torch.tensor([[0.2, 0.4, 0.0], [0.6, 0.0, 0.0]])   # k1 = logprob - ref
ENT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def test_align_pads_with_one_and_truncates():
    out = align_token_weights([[0.5, 2.0], [1.5, 0.25, 3.0, 9.0]], response_len=3)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.5, 2.0, 1.0], [1.5, 0.25, 3.0]]


def test_align_accepts_tensor_rows_and_2d_tensor():
    rows = [torch.tensor([0.5]), torch.tensor([0.75, 0.125])]
    assert align_token_weights(rows, 2).tolist() == [[0.5, 1.0], [0.75, 0.125]]
    assert align_token_weights(torch.tensor([[0.5, 0.5, 0.5]]), 2).tolist() == [[0.5, 0.5]]


def test_align_turns_integers_into_floats():
    out = align_token_weights(torch.tensor([[2, 0]]), 3)
    assert out.is_floating_point() and out.tolist() == [[2.0, 0.0, 1.0]]


def test_apply_pg_keeps_mask_and_returns_weights():
    pg_weight, loss_mask = apply_token_weights(MASK, WEIGHTS, "pg")
    assert torch.equal(pg_weight, WEIGHTS) and torch.equal(loss_mask, MASK)


def test_apply_mask_scales_mask():
    pg_weight, loss_mask = apply_token_weights(MASK, WEIGHTS, "mask")
    assert torch.equal(pg_weight, torch.ones(2, 3))
    assert loss_mask.tolist() == [[0.5, 2.0, 0.0], [0.25, 0.0, 0.0]]


def test_fractional_weights_survive_an_integer_mask():
    _, loss_mask = apply_token_weights(MASK.long(), WEIGHTS, "mask")
    assert loss_mask.dtype == torch.float32 and loss_mask[1, 0].item() == 0.25


def test_apply_without_weights_is_identity():
    pg_weight, loss_mask = apply_token_weights(MASK, None, "mask")
    assert torch.equal(pg_weight, torch.ones(2, 3)) and torch.equal(loss_mask, MASK)


def test_apply_rejects_unknown_mode_and_negative_or_nan_weights():
    with pytest.raises(ValueError, match="'pg', 'mask'"):
        apply_token_weights(MASK, WEIGHTS, "loss")
    with pytest.raises(ValueError, match=">= 0"):
        apply_token_weights(MASK, -WEIGHTS, "pg")
    with pytest.raises(ValueError, match="'token_weights'"):
        apply_token_weights(MASK, torch.full((2, 3), float("nan")), "pg")


def test_pg_mode_scales_policy_term_but_not_token_mean_denominator():
    loss, _ = ppo_policy_loss(ZERO, ZERO, ADV, MASK, token_weights=WEIGHTS, token_weights_apply_to="pg")
    assert loss.item() == pytest.approx(-(0.5 * 1 + 2.0 * 1 + 0.25 * 2) / 3)


def test_mask_mode_divides_token_mean_by_sum_of_weights():
    loss, _ = ppo_policy_loss(ZERO, ZERO, ADV, MASK, token_weights=WEIGHTS, token_weights_apply_to="mask")
    assert loss.item() == pytest.approx(-(0.5 + 2.0 + 0.5) / 2.75)


def test_mask_mode_changes_sequence_mean_denominators():
    kw = dict(token_weights=WEIGHTS, agg_mode="seq-mean-token-mean")
    pg, _ = ppo_policy_loss(ZERO, ZERO, ADV, MASK, token_weights_apply_to="pg", **kw)
    mk, _ = ppo_policy_loss(ZERO, ZERO, ADV, MASK, token_weights_apply_to="mask", **kw)
    assert pg.item() == pytest.approx((-(0.5 + 2.0) / 2 - 0.5 / 1) / 2)
    assert mk.item() == pytest.approx((-(0.5 + 2.0) / 2.5 - 0.5 / 0.25) / 2)


def test_pg_mode_leaves_kl_and_entropy_unchanged():
    _, m = actor_loss(ZERO, ZERO, ADV, MASK, token_weights=WEIGHTS, token_weights_apply_to="pg",
                      ref_logprob=REF, kl_coef=0.1, kl_kind="kl", entropy=ENT, entropy_coef=0.01)
    _, unweighted = actor_loss(ZERO, ZERO, ADV, MASK, ref_logprob=REF, kl_coef=0.1, kl_kind="kl",
                               entropy=ENT, entropy_coef=0.01)
    assert m["kl_loss"].item() == pytest.approx((0.2 + 0.4 + 0.6) / 3) == unweighted["kl_loss"].item()
    assert m["entropy"].item() == pytest.approx((1 + 2 + 4) / 3) == unweighted["entropy"].item()


def test_mask_mode_scales_kl_and_entropy():
    loss, m = actor_loss(ZERO, ZERO, ADV, MASK, token_weights=WEIGHTS, token_weights_apply_to="mask",
                         ref_logprob=REF, kl_coef=0.1, kl_kind="kl", entropy=ENT, entropy_coef=0.01)
    kl = (0.5 * 0.2 + 2.0 * 0.4 + 0.25 * 0.6) / 2.75
    ent = (0.5 * 1 + 2.0 * 2 + 0.25 * 4) / 2.75
    assert m["kl_loss"].item() == pytest.approx(kl) and m["entropy"].item() == pytest.approx(ent)
    assert loss.item() == pytest.approx(-3.0 / 2.75 + 0.1 * kl - 0.01 * ent)


def test_fractional_weight_gradient_is_fractional():
    lp = ZERO.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(ZERO, lp, ADV, MASK, token_weights=WEIGHTS, token_weights_apply_to="pg")
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5 / 3, -2.0 / 3, 0.0], [-0.5 / 3, 0.0, 0.0]]))
