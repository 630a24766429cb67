"""Registries: every name resolves, unknown names list the valid ones, users can add entries."""
import pytest
import torch

import megatron_rl.algos as algos
from megatron_rl.algos import (ADVANTAGE_ESTIMATORS, AGG_MODES, KL_CONTROLLERS, KL_PENALTIES, POLICY_LOSSES,
                               Registry, get_advantage_estimator, get_agg_mode, get_kl_controller,
                               get_kl_penalty, get_policy_loss, register_advantage_estimator)


@pytest.mark.parametrize("name,fn", [("grpo", algos.grpo_advantage), ("rloo", algos.rloo_advantage),
                                     ("reinforce_plus_plus", algos.reinforce_pp_advantage),
                                     ("gae", algos.gae_advantage)])
def test_advantage_estimators_by_name(name, fn):
    assert get_advantage_estimator(name).__wrapped__ is fn


@pytest.mark.parametrize("name,fn", [("ppo", algos.ppo_policy_loss), ("gspo", algos.gspo_policy_loss)])
def test_policy_losses_by_name(name, fn):
    assert get_policy_loss(name) is fn


def test_kl_penalties_by_name():
    assert set(KL_PENALTIES) == {"kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"}
    assert get_kl_penalty("k3") is KL_PENALTIES["low_var_kl"]


def test_agg_modes_and_controllers_by_name():
    assert set(AGG_MODES) == {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
    assert get_agg_mode("token-mean")(torch.ones(1, 2), torch.ones(1, 2)).item() == 1.0
    assert get_kl_controller("adaptive") is algos.AdaptiveKLController


@pytest.mark.parametrize("getter,registry", [(get_advantage_estimator, ADVANTAGE_ESTIMATORS),
                                             (get_policy_loss, POLICY_LOSSES), (get_agg_mode, AGG_MODES),
                                             (get_kl_controller, KL_CONTROLLERS)])
def test_unknown_name_lists_valid_names(getter, registry):
    with pytest.raises(ValueError) as err:
        getter("no_such_thing")
    assert all(name in str(err.value) for name in registry)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        get_advantage_estimator("grp")


def test_user_estimator_registers_behind_uniform_adapter():
    @register_advantage_estimator("test_constant")
    def constant(token_rewards, response_mask, gamma=1.0):
        return token_rewards * 0 + gamma, token_rewards

    try:
        adv, _ = get_advantage_estimator("test_constant")(token_rewards=torch.zeros(1, 2),
                                                          response_mask=torch.ones(1, 2), gamma=3.0, lam=0.5)
        assert adv.tolist() == [[3.0, 3.0]]
    finally:
        del ADVANTAGE_ESTIMATORS["test_constant"]


def test_estimator_outside_uniform_signature_is_rejected():
    with pytest.raises(TypeError, match="temperature"):
        register_advantage_estimator("bad")(lambda token_rewards, response_mask, temperature: None)


def test_duplicate_registration_is_an_error():
    reg = Registry("thing")
    reg.register("a")(len)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(max)
