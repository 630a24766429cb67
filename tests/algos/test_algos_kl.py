"""KL estimators, the straight-through variants and the KL controllers."""
import math

import pytest
import torch

from megatron_rl.algos import get_kl_penalty, kl_controller, kl_penalised_rewards, kl_penalty

LP = torch.tensor([-1.0], dtype=torch.float64)
REF = torch.tensor([-1.5], dtype=torch.float64)


@pytest.mark.parametrize("kind,expected", [
    ("kl", 0.5), ("k1", 0.5), ("abs", 0.5), ("mse", 0.125), ("k2", 0.125),
    ("low_var_kl", math.exp(-0.5) + 0.5 - 1), ("k3", math.exp(-0.5) + 0.5 - 1),
])
def test_estimator_values(kind, expected):
    torch.testing.assert_close(kl_penalty(LP, REF, kind), torch.tensor([expected], dtype=torch.float64))


def test_abs_is_symmetric():
    assert kl_penalty(REF, LP, "abs").item() == 0.5


def test_low_var_kl_is_clamped_to_ten():
    out = kl_penalty(torch.tensor([0.0, -15.0]), torch.tensor([-30.0, 0.0]), "low_var_kl")
    assert out.tolist() == [10.0, 10.0]


@pytest.mark.parametrize("kind", ["low_var_kl+", "k3+", "kl+", "abs+", "k2+"])
def test_straight_through_keeps_value_and_takes_k2_gradient(kind):
    lp = LP.clone().requires_grad_(True)
    out = kl_penalty(lp, REF, kind)
    torch.testing.assert_close(out.detach(), kl_penalty(LP, REF, kind[:-1]))
    out.sum().backward()
    torch.testing.assert_close(lp.grad, LP - REF)  # d/dlp of 0.5 (lp - ref)^2


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(LP, REF, "k4")
    with pytest.raises(ValueError, match="valid names"):
        get_kl_penalty("k5+")


def test_nan_logprob_raises_naming_the_argument():
    with pytest.raises(ValueError, match="'ref_logprob'"):
        kl_penalty(LP, torch.tensor([float("nan")], dtype=torch.float64), "kl")


def test_kl_penalised_rewards_subtract_coef_times_kl_on_valid_tokens():
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    ref = torch.full((1, 4), -0.5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, mean_kl = kl_penalised_rewards(scores, old, ref, mask, kl_coef=0.1, kind="kl")
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 0.95, 0.0]]))
    assert mean_kl.item() == pytest.approx(0.5)


def test_fixed_controller_never_changes():
    ctl = kl_controller("fixed", init_kl_coef=0.1)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.1


def test_adaptive_controller_follows_ziegler_update_with_clipped_error():
    ctl = kl_controller("adaptive", init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=512)  # error 1.0 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    ctl2 = kl_controller("adaptive", init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    ctl2.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_controller_state_round_trips():
    ctl = kl_controller("adaptive", init_kl_coef=0.1, target_kl=6.0, horizon=10)
    ctl.update(12.0, 1)
    other = kl_controller("adaptive", init_kl_coef=0.1, target_kl=6.0, horizon=10)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_adaptive_controller_requires_target_and_horizon():
    with pytest.raises(ValueError, match="target_kl"):
        kl_controller("adaptive", init_kl_coef=0.1, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        kl_controller("adaptive", init_kl_coef=0.1, target_kl=1.0)
    with pytest.raises(ValueError, match="'fixed'"):
        kl_controller("adaptiv", init_kl_coef=0.1)


def test_current_kl_is_mean_of_per_sequence_means():
    old = torch.zeros(2, 3)
    ref = -torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    _, current = kl_penalised_rewards(torch.zeros(2, 3), old, ref, mask, kl_coef=0.0)
    assert current.item() == pytest.approx((1.0 + 4.0) / 2)
