"""Megatron-Core model providers, the HF weight mapping and checkpoint loading."""
from megatron_rl.models.hf_config import ModelArch, arch_from_hf_config, arch_to_hf_config
from megatron_rl.models.loading import (iter_hf_weights, load_checkpoint, load_hf_weights,
                                        load_mcore_checkpoint, save_mcore_checkpoint)
from megatron_rl.models.provider import build_model

__all__ = ["ModelArch", "arch_from_hf_config", "arch_to_hf_config", "build_model", "load_checkpoint",
           "load_hf_weights", "iter_hf_weights", "save_mcore_checkpoint", "load_mcore_checkpoint"]
