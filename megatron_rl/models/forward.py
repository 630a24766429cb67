"""Inputs for Megatron GPTModel forward passes from padded token batches, and a forward
that stops at the final hidden states (value heads, attention rows)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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


@contextmanager
def final_hidden_states(gpt) -> Iterator[dict | None]:
    """Within the scope, a forward of `gpt` (the bare GPTModel) on the last pipeline stage
    leaves its final hidden states `[s, b, h]` (after the final norm) in the yielded dict
    under "hidden", and its output layer projects only the first position: callers that
    read hidden states (value heads, attention rows) skip the `[s, b, vocab]` projection
    without changing the model. A forward pre-hook on `output_layer` does it (torch's API;
    Megatron-Core 0.16 `GPTModel` has no switch for it). None on other stages."""
    if not gpt.post_process:
        yield None
        return
    captured: dict = {}

    def keep_hidden(module, args, kwargs):
        captured["hidden"] = args[0]
        return (args[0][:1],) + tuple(args[1:]), kwargs

    handle = gpt.output_layer.register_forward_pre_hook(keep_hidden, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()
