"""SteeringConfig validation and the two shipped YAML configs."""
from pathlib import Path

import pytest

from megatron_rl.steering import SteeringConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["sae_steer_single.yaml", "sae_steer_predictor.yaml"])
def test_shipped_configs_load_under_the_root_schema(name):
    from megatron_rl.config.loader import load_config
    from megatron_rl.config.schema import Config

    cfg = load_config(Config, ROOT / "configs" / name)
    assert isinstance(cfg.steering, SteeringConfig) and cfg.steering.enable
    if cfg.steering.predictor.enable:
        assert cfg.steering.predictor.n_samples == cfg.rollout.n


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="steer"), "steering.mode must be one of add|clamp|direction_clamp|global"),
    (dict(scope="response"), "steering.scope must be one of all|generated|prompt"),
    (dict(logprob_mode="rollout"), "steering.logprob_mode"),
    (dict(feature_idxs=[1, 2], strengths=[1.0]), "strengths has 1 entries but feature_idxs has 2"),
    (dict(enable=True), "feature_idxs is empty"),
])
def test_invalid_config_is_an_error_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SteeringConfig(**kwargs)


def test_predictor_section_from_a_dict():
    cfg = SteeringConfig(predictor={"enable": True, "repr": "last"})
    assert cfg.predictor.enable and cfg.predictor.repr == "last"
