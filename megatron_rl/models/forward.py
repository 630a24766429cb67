"""Inputs for Megatron GPTModel forward passes from padded token batches, and a forward
that stops at the final hidden states (value heads, attention rows)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from megatron_rl.parallel.context_parallel import cp_size


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
                position_ids: torch.Tensor | None = None, images=None) -> torch.Tensor:
    """Logits `[b, s, vocab/tp]` (or hidden states on a non-last pipeline stage).

    A vision-language model (models/vl) also gets the micro-batch's `images` (an
    `ImageBatch` or None) and M-RoPE position ids `[3, b, s]` from its image grids;
    images given to a text-only model are an error."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cp_size() > 1:
        return context_parallel_forward(model, input_ids, attention_mask, position_ids, images)
    mask = causal_padding_mask(attention_mask) if not bool(attention_mask.all()) else None
    vl = vision_language_model(model)
    if vl is not None:
        if images is None and bool((input_ids == vl.image_token_id).any()):
            raise ValueError("gpt_forward: input_ids hold image-pad tokens but no images were given; pass the "
                             "micro-batch's ImageBatch (mb['images']) so the vision features fill them "
                             "(a forward that drops them, e.g. a critic's value_forward, would read pad embeddings)")
        if position_ids is None:
            position_ids = vision_position_ids(vl, input_ids, attention_mask, images)
        return model(input_ids, position_ids, mask, images=images)
    if images is not None:
        raise ValueError(f"the batch holds images but the model ({type(model).__name__}) is text-only; "
                         "load a vision-language checkpoint (Qwen2-VL / Qwen2.5-VL) or drop data.image.key's column")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids, position_ids, mask)


def context_parallel_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             position_ids: torch.Tensor | None = None, images=None) -> torch.Tensor:
    """`model.cp > 1`: this CP rank's share `[b, s'/cp, vocab/tp]` of the logits, s' = s padded on
    the right to a multiple of 2*cp, in `CPLayout.padded(s')` order (parallel/context_parallel.py);
    the attention mask holds the local query rows against all (gathered) key columns."""
    from megatron_rl.parallel.context_parallel import (CPLayout, cp_rank, pad_sequence_dim,
                                                       padded_attention_mask)

    if images is not None or vision_language_model(model) is not None:
        raise ValueError("model.cp > 1 does not cover vision-language models (M-RoPE, image features); set model.cp=1")
    spec = spec_name(model)
    if spec != "sdpa":
        raise ValueError(f"model.cp > 1 with padded micro-batches runs on the sdpa spec only (this model: "
                         f"{spec!r}; te's CP attention takes no padding mask): set model.layer_spec=sdpa, or pack "
                         "(actor.max_tokens_per_microbatch > 0) for te")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    multiple = 2 * cp_size()
    ids, am, pos = (pad_sequence_dim(x, multiple) for x in (input_ids, attention_mask, position_ids))
    layout = CPLayout.padded(ids.size(1), cp_size(), cp_rank(), device=ids.device)
    return model(layout.shard(ids), layout.shard(pos), padded_attention_mask(am, layout))


def spec_name(model) -> str:
    """The layer spec a (wrapped) model was built with (`layer_spec_name`, set by models/provider)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "layer_spec_name", "local")


def _vision_language_class():
    """models/vl's VisionLanguageModel (None while that package is absent)."""
    try:
        from megatron_rl.models.vl.model import VisionLanguageModel
    except ModuleNotFoundError as e:
        if e.name not in ("megatron_rl.models.vl", "megatron_rl.models.vl.model"):
            raise
        return None
    return VisionLanguageModel


def vision_language_model(model):
    """The VisionLanguageModel inside DDP / Float16Module wrappers, or None (a text model)."""
    cls = _vision_language_class()
    if cls is None:
        return None
    m = model
    while not isinstance(m, cls):
        if not hasattr(m, "module"):
            return None
        m = m.module
    return m


def vision_position_ids(vl, input_ids: torch.Tensor, attention_mask: torch.Tensor, images) -> torch.Tensor:
    """M-RoPE position ids `[3, b, s]` (transformers' get_rope_index, models/vl) for a padded batch."""
    from megatron_rl.models.vl import mrope_position_ids

    grid = None if images is None else images.image_grid_thw
    return mrope_position_ids(input_ids, attention_mask, grid, vl.arch).to(input_ids.device)


def language_model(model):
    """The bare GPTModel inside DDP / Float16Module wrappers (a VisionLanguageModel is
    one: its decoder layers, output layer and config are the language model's)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


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
