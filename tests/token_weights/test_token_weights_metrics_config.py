"""Weight statistics and the `token_weights:` config section."""
import pytest
import torch

from megatron_rl.token_weights import TokenWeightsConfig
from megatron_rl.token_weights.metrics import token_weight_metrics


def test_metrics_over_valid_tokens_only():
    w = torch.tensor([[0.5, 1.5, 99.0], [1.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    m = token_weight_metrics(w, mask)
    assert m["token_weights/mean"] == pytest.approx(1.5)
    assert m["token_weights/std"] == pytest.approx(((1 + 0 + 0.25 + 2.25) / 4) ** 0.5)    # population std
    assert (m["token_weights/min"], m["token_weights/max"]) == (0.5, 3.0)


def test_clip_fraction_counts_unclipped_weights_outside_the_range():
    raw = torch.tensor([[0.1, 1.0, 5.0, 1.0]])
    m = token_weight_metrics(raw.clamp(0.2, 3.0), torch.ones(1, 4), unclipped=raw, clip=(0.2, 3.0))
    assert m["token_weights/clip_frac"] == 0.5


def test_advantage_correlation_sign():
    mask = torch.ones(2, 2)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    up = token_weight_metrics(torch.tensor([[2.0, 2.0], [0.5, 0.5]]), mask, adv)["token_weights/adv_corr"]
    down = token_weight_metrics(torch.tensor([[0.5, 0.5], [2.0, 2.0]]), mask, adv)["token_weights/adv_corr"]
    assert up == pytest.approx(1.0) and down == pytest.approx(-1.0)
    assert token_weight_metrics(torch.ones(2, 2), mask, adv)["token_weights/adv_corr"] == 0.0


@pytest.mark.parametrize("key,value,match", [("source", "attention", "source must be one of none|reward|vgr"),
                                              ("apply_to", "loss", "apply_to must be one of pg|mask"),
                                              ("missing", "ignore", "missing must be one of warn_once|error"),
                                              ("clip", [3.0, 0.2], "clip must be"),
                                              ("context_markers", [["<doc>"]], r"context_markers\[0\]")])
def test_config_errors_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        TokenWeightsConfig(**{key: value})


def test_shipped_config_loads_with_vgr_on_and_override_turns_it_off():
    from megatron_rl.config import load_experiment_config

    on = load_experiment_config("configs/grpo_vgr_cpu.yaml")
    off = load_experiment_config("configs/grpo_vgr_cpu.yaml", ["token_weights.source=none"])
    assert on.token_weights.source == "vgr" and on.token_weights.clip == [0.2, 3.0]
    assert on.token_weights.context_markers == [["<document>", "</document>"]]
    assert off.token_weights.source == "none"
