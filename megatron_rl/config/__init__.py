"""Typed YAML experiment configs with dotted CLI overrides."""
from megatron_rl.config.loader import ConfigError, from_dict, load_config, to_dict
from megatron_rl.config.schema import Config


def load_experiment_config(path=None, overrides=None) -> Config:
    return load_config(Config, path, overrides)


__all__ = ["Config", "ConfigError", "load_config", "load_experiment_config", "from_dict", "to_dict"]
