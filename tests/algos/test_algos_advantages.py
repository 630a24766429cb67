"""Advantage estimators against hand-computed values."""
import math
import statistics

import pytest
import torch

from megatron_rl.algos import (gae_advantage, get_advantage_estimator, grpo_advantage,
                               reinforce_pp_advantage, rloo_advantage)

EPS = 1e-6


def _outcome(scores, length=3):
    """Rewards on the last token of full-length responses."""
    r = torch.zeros(len(scores), length, dtype=torch.float64)
    r[:, -1] = torch.tensor(scores, dtype=torch.float64)
    return r


def test_grpo_normalises_by_group_mean_and_unbiased_std():
    rewards = _outcome([1.0, 0.0, 2.0, 3.0])
    mask = torch.ones_like(rewards)
    adv, ret = grpo_advantage(rewards, mask, ["a", "a", "a", "b"])
    # group a: mean 1, unbiased std 1; group b (size 1): mean 0, std 1
    expected = torch.tensor([0.0, -1 / (1 + EPS), 1 / (1 + EPS), 3 / (1 + EPS)], dtype=torch.float64)
    torch.testing.assert_close(adv, expected[:, None].expand(4, 3))
    torch.testing.assert_close(ret, adv)


def test_grpo_without_std_is_dr_grpo_mean_centering():
    adv, _ = grpo_advantage(_outcome([1.0, 0.0, 2.0, 3.0]), torch.ones(4, 3), ["a", "a", "a", "b"],
                            norm_by_std=False)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.0, -1.0, 1.0, 3.0], dtype=torch.float64))


def test_grpo_sums_token_rewards_and_zeroes_masked_tokens():
    rewards = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, _ = grpo_advantage(rewards, mask, [7, 7])
    a = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0.0], [-a, -a, -a]]))


def test_grpo_zero_std_group_gets_zero_advantage():
    adv, _ = grpo_advantage(_outcome([1.0, 1.0]), torch.ones(2, 3), ["g", "g"])
    assert torch.equal(adv, torch.zeros(2, 3, dtype=torch.float64))


def test_grpo_groups_need_not_be_adjacent_and_accept_tensor_index():
    r = _outcome([1.0, 5.0, 0.0])
    a1, _ = grpo_advantage(r, torch.ones(3, 3), torch.tensor([0, 1, 0]))
    a2, _ = grpo_advantage(r, torch.ones(3, 3), [("p", 0), ("p", 1), ("p", 0)])
    s = 1 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(a1[:, 0], torch.tensor([0.5 * s, 5 / (1 + EPS), -0.5 * s], dtype=torch.float64))
    torch.testing.assert_close(a1, a2)


def test_grpo_group_index_length_mismatch_raises():
    with pytest.raises(ValueError, match="group_index has 1 entries"):
        grpo_advantage(_outcome([1.0, 2.0]), torch.ones(2, 3), ["a"])


def test_rloo_subtracts_leave_one_out_mean():
    adv, ret = rloo_advantage(_outcome([1.0, 0.0, 2.0, 3.0]), torch.ones(4, 3), ["a", "a", "a", "b"])
    # a: 1-(0+2)/2=0, 0-(1+2)/2=-1.5, 2-(1+0)/2=1.5 ; b alone: no baseline
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.0, -1.5, 1.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(ret, adv)


def test_reinforce_pp_discounts_and_whitens_over_valid_tokens():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, ret = reinforce_pp_advantage(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]], dtype=torch.float64))
    vals = [0.25, 0.5, 1.0, 1.0, 2.0]
    mean, var = statistics.fmean(vals), statistics.variance(vals)  # unbiased
    exp = [(v - mean) / math.sqrt(var + 1e-8) for v in vals]
    torch.testing.assert_close(adv, torch.tensor([exp[:3], exp[3:] + [0.0]], dtype=torch.float64))


def test_reinforce_pp_carries_return_through_observation_span_undiscounted():
    rewards = torch.tensor([[0.0, 5.0, 5.0, 1.0]], dtype=torch.float64)  # rewards on obs tokens ignored
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    _, ret = reinforce_pp_advantage(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.0, 0.0, 1.0]], dtype=torch.float64))


def test_gae_matches_hand_computed_recursion():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 0.4]], dtype=torch.float64)
    adv, ret = gae_advantage(rewards, values, torch.ones_like(rewards), gamma=0.9, lam=0.8)
    raw = [0.10624, 0.592, 0.6]  # A2=1-0.4; A1=0.36-0.2+0.72*A2; A0=0.18-0.5+0.72*A1
    torch.testing.assert_close(ret, torch.tensor([[0.60624, 0.792, 1.0]], dtype=torch.float64))
    mean, var = statistics.fmean(raw), statistics.variance(raw)
    torch.testing.assert_close(adv, torch.tensor([[(a - mean) / math.sqrt(var + 1e-8) for a in raw]],
                                                 dtype=torch.float64))


def test_gae_skips_observation_tokens_like_they_were_absent():
    rewards = torch.tensor([[0.0, 3.0, 3.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 9.0, 9.0, 0.4]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    _, ret = gae_advantage(rewards, values, mask, gamma=0.9, lam=0.8)
    # same as the 2-token response [0, 1] with values [0.5, 0.4]: A1=0.6, A0=-0.14+0.72*0.6
    torch.testing.assert_close(ret, torch.tensor([[0.292 + 0.5, 0.0, 0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus", "gae"])
def test_all_masked_rows_give_zero_and_no_nan(name):
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    adv, ret = get_advantage_estimator(name)(token_rewards=rewards, response_mask=mask, group_index=[0, 0],
                                             values=torch.zeros(2, 2), gamma=1.0, lam=1.0)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert torch.equal(adv[1], torch.zeros(2)) and torch.equal(ret[1], torch.zeros(2))


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "gae"])
def test_all_masked_batch_gives_zeros(name):
    adv, _ = get_advantage_estimator(name)(token_rewards=torch.ones(2, 3), response_mask=torch.zeros(2, 3),
                                           values=torch.zeros(2, 3), gamma=1.0, lam=1.0)
    assert torch.equal(adv, torch.zeros(2, 3))


def test_nan_reward_raises_naming_the_argument():
    rewards = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="'token_rewards'"):
        grpo_advantage(rewards, torch.ones(1, 2), [0])


def test_inf_value_raises_naming_the_argument():
    with pytest.raises(ValueError, match="'values'"):
        gae_advantage(torch.zeros(1, 2), torch.tensor([[0.0, float("inf")]]), torch.ones(1, 2), 1.0, 1.0)


def test_uniform_adapter_ignores_unused_args_and_requires_needed_ones():
    est = get_advantage_estimator("grpo")
    adv, _ = est(token_rewards=_outcome([1.0, 0.0]), response_mask=torch.ones(2, 3), group_index=[0, 0],
                 values=None, gamma=0.9, lam=0.95, norm_by_std=False, eps=None)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.5, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="'gae' needs 'values'"):
        get_advantage_estimator("gae")(token_rewards=torch.zeros(1, 2), response_mask=torch.ones(1, 2),
                                       gamma=1.0, lam=1.0)


def test_groups_with_signal_flags_groups_whose_rewards_differ():
    from megatron_rl.algos import groups_with_signal
    flags = groups_with_signal(_outcome([1.0, 1.0, 0.0, 1.0, 5.0]), ["a", "a", "b", "b", "c"])
    assert flags.tolist() == [False, False, True, True, False]
