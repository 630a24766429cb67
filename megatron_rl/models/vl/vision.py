"""The vision tower: transformers' own Qwen2-VL / Qwen2.5-VL ViT (patch embed, windowed and
full-attention blocks, 2x2 patch merger), wrapped, not rewritten.

Why wrapped and replicated over TP (docs/VISION_LANGUAGE.md): it is small next to the
language model (0.68B of Qwen2.5-VL-7B's 8.29B parameters; ~7% of a GRPO step's FLOPs for
a 1280-token image in a 2k + 2k-token sample), its windowed attention with per-image cu_seqlens has no Megatron
counterpart to reuse, and the transformers module is the reference the parity tests
compare against. Every TP rank of the first pipeline stage holds it whole and computes
the same features; its gradients are then identical over TP (the features enter a
replicated embedding output), so Megatron's DDP reduces them over DP only, like any
replicated parameter.
"""
from __future__ import annotations

import json

import torch

from megatron_rl.models.vl.config import hf_transformers_config

VISION_PREFIX = "visual."       # the module's name in our model and in HF checkpoints


def _tower_class(arch):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return Qwen2_5_VisionTransformerPretrainedModel if arch.family == "qwen2_5_vl" \
        else Qwen2VisionTransformerPretrainedModel


def build_vision_tower(arch, dtype: torch.dtype) -> torch.nn.Module:
    """The transformers vision module of `arch` (random weights; loading fills them)."""
    tower = _tower_class(arch)._from_config(hf_transformers_config(arch).vision_config, dtype=dtype)
    if torch.cuda.is_available():
        tower.cuda(torch.cuda.current_device())
    return tower


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def vision_param_shapes(arch) -> dict[str, tuple[int, ...]]:
    """{HF name ("visual.…"): shape} of the tower, in module order, without allocating it
    (a meta-device build, cached per vision config)."""
    key = arch.family + json.dumps(arch.vl_config.get("vision_config"), sort_keys=True, default=str)
    if key not in _SHAPES:
        with torch.device("meta"):
            tower = _tower_class(arch)._from_config(hf_transformers_config(arch).vision_config)
        _SHAPES[key] = {VISION_PREFIX + n: tuple(p.shape) for n, p in tower.named_parameters()}
    return _SHAPES[key]


def vision_param_count(arch) -> int:
    return sum(int(torch.Size(s).numel()) for s in vision_param_shapes(arch).values())


def image_features(tower, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """[image tokens, hidden]: the merger's output for every image, in image order."""
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values.to(dtype), grid_thw=image_grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out
