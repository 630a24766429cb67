"""Inputs for Megatron GPTModel forward passes from padded token batches."""
from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only (left padding gets position 0), as HF does."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask in Megatron's convention (True = masked out).

    Padded key columns are masked; a fully padded query row keeps its own column so
    softmax stays finite (its output is never used).
    """
    b, s = attention_mask.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    keep = causal[None] & attention_mask.bool()[:, None, :]
    keep = keep | torch.eye(s, dtype=torch.bool, device=attention_mask.device)[None]
    return (~keep)[:, None]


def gpt_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits `[b, s, vocab/tp]` (or hidden states on a non-last pipeline stage)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    mask = causal_padding_mask(attention_mask) if not bool(attention_mask.all()) else None
    return model(input_ids, position_ids, mask)
