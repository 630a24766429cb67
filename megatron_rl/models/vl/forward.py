"""A full forward of a VisionLanguageModel on padded image+text rows (parity checks,
log-probs): M-RoPE positions from the image grids, padding mask, images on the first stage."""
from __future__ import annotations

import torch

from megatron_rl.models.forward import causal_padding_mask
from megatron_rl.models.vl.rope_index import mrope_position_ids


def vl_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, images=None):
    """Logits `[b, s, vocab/tp]` (hidden states on a non-last stage); `images` an ImageBatch or None;
    `model` bare or DDP-wrapped."""
    from megatron_rl.models.loading import unwrap

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    grid = images.image_grid_thw if images is not None else None
    pos = mrope_position_ids(input_ids, attention_mask, grid, unwrap(model).arch).to(input_ids.device)
    mask = causal_padding_mask(attention_mask) if not bool(attention_mask.all()) else None
    return model(input_ids, pos, mask, images=images)
