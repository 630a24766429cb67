"""PPO and GSPO losses: hand-computed values, metrics and gradients."""
import math

import pytest
import torch

from megatron_rl.algos import gspo_policy_loss, ppo_policy_loss

RATIOS = [1.5, 0.5, 1.1, 0.5, 4.0]
ADV = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)


def _ppo_inputs():
    old = torch.zeros(1, 5, dtype=torch.float64)
    lp = torch.log(torch.tensor([RATIOS], dtype=torch.float64)).requires_grad_(True)
    return old, lp, torch.ones(1, 5, dtype=torch.float64)


def test_ppo_clipped_surrogate_with_dual_clip():
    old, lp, mask = _ppo_inputs()
    loss, m = ppo_policy_loss(old, lp, ADV, mask, clip_low=0.2, clip_high=0.2, clip_c=3.0)
    # per token: clip(1.5)->-1.2, -0.5, -1.1, clip(0.5)->0.8, dual clip 4 -> 3
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 0.8 + 3.0) / 5)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 5)
    assert m["ppo_kl"].item() == pytest.approx(-math.log(1.5 * 0.5 * 1.1 * 0.5 * 4.0) / 5)


def test_ppo_gradient_is_zero_on_clipped_tokens():
    old, lp, mask = _ppo_inputs()
    loss, _ = ppo_policy_loss(old, lp, ADV, mask)
    loss.backward()
    # unclipped tokens: d(-A r)/dlogp = -A r, over 5 tokens
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.5 / 5, -1.1 / 5, 0.0, 0.0]], dtype=torch.float64))


def test_ppo_without_dual_clip_keeps_large_negative_term():
    old, lp, mask = _ppo_inputs()
    loss, m = ppo_policy_loss(old, lp, ADV, mask, clip_c=None)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 0.8 + 4.0) / 5)
    assert m["pg_clipfrac_lower"].item() == 0.0


def test_ppo_clip_higher_widens_upper_bound_only():
    old, lp, mask = _ppo_inputs()
    loss, _ = ppo_policy_loss(old, lp, ADV, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.1 + 0.8 + 3.0) / 5)


def test_ppo_metrics_are_detached_and_ignore_masked_tokens():
    old, lp, _ = _ppo_inputs()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    loss, m = ppo_policy_loss(old, lp, ADV, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1) / 3)
    assert m["pg_clipfrac"].item() == pytest.approx(1 / 3) and m["pg_clipfrac_lower"].item() == 0.0
    assert all(not v.requires_grad for v in m.values())


def test_ppo_rejects_dual_clip_bound_not_above_one():
    old, lp, mask = _ppo_inputs()
    with pytest.raises(ValueError, match="clip_c"):
        ppo_policy_loss(old, lp, ADV, mask, clip_c=1.0)


@pytest.mark.parametrize("name", ["logprob", "old_logprob", "advantages"])
def test_policy_loss_nan_input_names_the_argument(name):
    old, lp, mask = _ppo_inputs()
    args = {"old_logprob": old, "logprob": lp.detach(), "advantages": ADV.clone()}
    args[name] = args[name].clone()
    args[name][0, 2] = float("nan")
    with pytest.raises(ValueError, match=f"'{name}'"):
        ppo_policy_loss(args["old_logprob"], args["logprob"], args["advantages"], mask)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_ppo_gradcheck_float64(agg_mode):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 6, dtype=torch.float64, generator=g) * 0.1
    lp = (old + torch.randn(3, 6, dtype=torch.float64, generator=g) * 0.4).requires_grad_(True)
    adv = torch.randn(3, 6, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [0.0] * 6], dtype=torch.float64)
    weights = torch.rand(3, 6, dtype=torch.float64, generator=g) + 0.5
    fn = lambda x: ppo_policy_loss(old, x, adv, mask, agg_mode=agg_mode, token_weights=weights)[0]
    assert torch.autograd.gradcheck(fn, (lp,))


def _gspo_inputs():
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.2, 0.9, 1.0], [2.0, 2.0, 1.0]], dtype=torch.float64))
    lp[1, 2] = 5.0  # masked token: must not enter the sequence ratio
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    return old, lp.requires_grad_(True), mask


def test_gspo_uses_length_normalised_sequence_ratio():
    old, lp, mask = _gspo_inputs()
    adv = torch.ones(2, 3, dtype=torch.float64)
    loss, m = gspo_policy_loss(old, lp, adv, mask, clip_low=0.2, clip_high=0.2)
    s0 = math.sqrt(1.2 * 0.9)  # unclipped; seq 1 has s=2, clipped to 1.2
    assert loss.item() == pytest.approx((-s0 - 1.2) / 2)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 4)
    loss.backward()
    # GSPO-token: d/dlogp_t = -A_t * s_i / |y_i| / batch on unclipped sequences
    torch.testing.assert_close(lp.grad, torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


def test_gspo_token_gradient_flows_per_token_with_token_advantages():
    old, lp, mask = _gspo_inputs()
    adv = torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    loss, _ = gspo_policy_loss(old, lp, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    s0 = math.sqrt(1.2 * 0.9)
    torch.testing.assert_close(lp.grad[0], torch.tensor([-2.0 * s0 / 4, 1.0 * s0 / 4, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("agg_mode", ["seq-mean-token-mean", "token-mean"])
def test_gspo_gradcheck_float64_with_sequence_advantages(agg_mode):
    # With one advantage per sequence the GSPO-token gradient equals the gradient of the
    # sequence-level objective, so finite differences agree with autograd.
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 5, dtype=torch.float64, generator=g) * 0.1
    lp = (old + torch.randn(3, 5, dtype=torch.float64, generator=g) * 0.3).requires_grad_(True)
    adv = torch.randn(3, 1, dtype=torch.float64, generator=g).expand(3, 5).contiguous()
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 2 + [0.0] * 3], dtype=torch.float64)
    fn = lambda x: gspo_policy_loss(old, x, adv, mask, clip_low=0.5, clip_high=0.5, agg_mode=agg_mode)[0]
    assert torch.autograd.gradcheck(fn, (lp,))
