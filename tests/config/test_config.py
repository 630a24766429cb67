"""Config loading: every shipped YAML loads; bad keys and values are errors that name
the key (and the closest valid one); dotted overrides reach nested sections."""
from pathlib import Path

import pytest

from megatron_rl.config import ConfigError, load_experiment_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_experiment_config(path)


def test_dotted_overrides_reach_nested_sections():
    cfg = load_experiment_config(None, ["actor.optim.lr=3e-6", "rollout.n=8", "algos.policy_loss=gspo",
                                        "rollout.stop=['</answer>']"])
    assert cfg.actor.optim.lr == 3e-6 and cfg.rollout.n == 8 and cfg.algos.policy_loss == "gspo"
    assert cfg.rollout.stop == ["</answer>"]


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'actor.optim.lrr'; did you mean 'lr'"):
        load_experiment_config(None, ["actor.optim.lrr=1"])


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'modle'; did you mean 'model'"):
        load_experiment_config(None, ["modle.path=x"])


def test_bad_type_names_the_key():
    with pytest.raises(ConfigError, match="rollout.n: expected an integer"):
        load_experiment_config(None, ["rollout.n=abc"])


def test_bad_registry_name_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="algos.adv_estimator"):
        load_experiment_config(None, ["algos.adv_estimator=grpoo"])


def test_yaml_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_experiment_config(bad)


def test_yaml_off_is_read_as_the_string_off(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("actor:\n  fused_loss: off\n")
    assert load_experiment_config(f).actor.fused_loss == "off"


def test_defaults_key_inherits_another_file(tmp_path):
    (tmp_path / "base.yaml").write_text("rollout:\n  n: 3\n  max_new_tokens: 7\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\nrollout:\n  n: 5\n")
    cfg = load_experiment_config(tmp_path / "child.yaml")
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens) == (5, 7)
