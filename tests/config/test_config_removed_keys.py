"""Removed and contradictory keys: old YAML gets an error that says what replaced the key."""
import pytest

from megatron_rl.config import ConfigError, load_experiment_config
from megatron_rl.config.loader import REMOVED_KEYS


@pytest.mark.parametrize("key,value,replacement", [
    ("algos.vgr.enabled", "true", "token_weights.source: vgr"),
    ("algos.vgr.last_k", "2", "token_weights.last_k_layers"),
    ("algos.vgr.smooth_sigma", "1.0", "token_weights.smooth_sigma"),
    ("algos.vgr.clip_min", "0.1", "token_weights.clip"),
    ("algos.vgr.clip_max", "2.0", "token_weights.clip"),
])
def test_removed_vgr_key_names_its_replacement(key, value, replacement):
    with pytest.raises(ConfigError, match=rf"'{key}' was removed: use {replacement}"):
        load_experiment_config(None, [f"{key}={value}"])


def test_removed_keys_in_yaml_are_each_named(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("algos:\n  vgr:\n    enabled: true\n    last_k: 4\n")
    with pytest.raises(ConfigError) as err:
        load_experiment_config(f)
    msg = str(err.value)
    assert str(f) in msg
    assert "'algos.vgr.enabled' was removed: use token_weights.source: vgr" in msg
    assert "'algos.vgr.last_k' was removed: use token_weights.last_k_layers" in msg


def test_removed_section_as_a_whole_points_at_token_weights():
    with pytest.raises(ConfigError, match=r"'algos.vgr' was removed: VGR is configured in the token_weights"):
        load_experiment_config(None, ["algos.vgr={}"])
    assert all(k.startswith("algos.vgr") for k in REMOVED_KEYS)


@pytest.mark.parametrize("overrides,match", [
    (["rollout.val_greedy=false"], "rollout.val_greedy=false .* must be > 0"),
    (["rollout.val_temperature=0.7"], "rollout.val_temperature=0.7 is unused while rollout.val_greedy is true"),
])
def test_validation_sampling_is_explicit(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment_config(None, overrides)


def test_validation_sampling_at_a_temperature_loads():
    r = load_experiment_config(None, ["rollout.val_greedy=false", "rollout.val_temperature=0.5"]).rollout
    assert (r.val_greedy, r.val_temperature) == (False, 0.5)
