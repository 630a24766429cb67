"""AlgosConfig validates names against the registries."""
import pytest

from megatron_rl.algos import AlgosConfig


def test_defaults_are_valid_grpo():
    cfg = AlgosConfig()
    assert cfg.adv_estimator == "grpo" and cfg.policy_loss_kwargs() == {"clip_low": 0.2, "clip_high": 0.2,
                                                                        "clip_c": 3.0}


def test_gspo_kwargs_have_no_dual_clip():
    cfg = AlgosConfig(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, loss_agg_mode="seq-mean-token-mean")
    assert cfg.policy_loss_kwargs() == {"clip_low": 3e-4, "clip_high": 4e-4}


@pytest.mark.parametrize("key,value,match", [
    ("adv_estimator", "grpoo", "algos.adv_estimator.*did you mean 'grpo'"),
    ("policy_loss", "ppo2", "algos.policy_loss"),
    ("loss_agg_mode", "mean", "algos.loss_agg_mode"),
    ("kl_loss_kind", "k4+", "algos.kl_loss_kind"),
    ("token_weights_apply_to", "both", "algos.token_weights_apply_to"),
    ("kl_ctrl", "adaptive", "target_kl"),
])
def test_invalid_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        AlgosConfig(**{key: value})


def test_adv_eps_must_be_positive():
    with pytest.raises(ValueError, match="algos.adv_eps"):
        AlgosConfig(adv_eps=0.0)


def test_vgr_section_is_gone():
    assert not hasattr(AlgosConfig(), "vgr")
