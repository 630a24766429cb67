"""3-D M-RoPE position ids of Qwen2-VL / Qwen2.5-VL prompts, as transformers computes them.

Text tokens advance all three (temporal, height, width) positions together; the tokens of
one image take a `t x h x w` grid of positions (after the 2x2 merger) starting at the
current position, and the text after it continues from max(grid) + 1. This calls
transformers' own `get_rope_index` (its static helper `get_vision_position_ids` is the
grid) rather than re-deriving it.
"""
from __future__ import annotations

import inspect
import types

import torch

from megatron_rl.models.vl.config import VL_ARCHITECTURES, hf_transformers_config


def _rope_owner(hf_cfg):
    """An object that `get_rope_index` can be called on: it reads only `self.config` and
    `self.get_vision_position_ids` (which does not read `self`)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    family = VL_ARCHITECTURES[(hf_cfg.architectures or ["Qwen2_5_VLForConditionalGeneration"])[0]]
    cls = Qwen2_5_VLModel if family == "qwen2_5_vl" else Qwen2VLModel
    owner = types.SimpleNamespace(config=hf_cfg)
    if hasattr(cls, "get_vision_position_ids"):          # transformers >= 5.2x: a helper of get_rope_index
        owner.get_vision_position_ids = types.MethodType(cls.get_vision_position_ids, owner)
    return cls, owner


def mrope_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_grid_thw,
                       hf_cfg) -> torch.Tensor:
    """LongTensor [3, B, S]: M-RoPE positions of left- or right-padded rows (padding gets 0).

    `image_grid_thw` [num_images, 3]: every row's images in row order (None: text only);
    `hf_cfg`: a ModelArch of a VL model, its config.json dict or the transformers config.
    """
    return mrope_position_ids_and_deltas(input_ids, attention_mask, image_grid_thw, hf_cfg)[0]


def mrope_position_ids_and_deltas(input_ids, attention_mask, image_grid_thw, hf_cfg):
    """(positions [3, B, S], rope_deltas [B, 1]): a row's decode step n (0-based, after
    its last prompt token) has position `real prompt tokens + n + delta` on all three axes
    (transformers' `rope_deltas`: max(position) + 1 - real prompt tokens)."""
    cfg = hf_transformers_config(hf_cfg)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if image_grid_thw is None or len(image_grid_thw) == 0:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1).clone(), torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
    cls, owner = _rope_owner(cfg)
    kwargs = dict(image_grid_thw=image_grid_thw.to(input_ids.device), attention_mask=attention_mask)
    if "mm_token_type_ids" in inspect.signature(cls.get_rope_index).parameters:
        # newer transformers take the processor's token types (text 0, image 1, video 2);
        # older ones find the images from vision_start / image_token_id in the config
        kwargs["mm_token_type_ids"] = (input_ids == cfg.image_token_id).int() + \
            2 * (input_ids == cfg.video_token_id).int()
    pos, deltas = cls.get_rope_index(owner, input_ids, **kwargs)
    return pos, deltas
