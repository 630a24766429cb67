"""Attention rows of response tokens over prompt columns, recomputed from the actor.

Rollout engines (vLLM, the native KV-cache engine) return no attention maps, and a
full `[heads, seq, seq]` map per layer is too large to keep. So the actor runs one
forward-only pass per micro-batch through Megatron's own schedule with a pre-hook on
the core attention of each selected layer. The hook takes the (RoPE-applied) query
and key that the layer's attention is about to use and computes, `row_chunk` response
queries at a time, `softmax(q k^T * scale + mask)` over all keys, keeping only the
prompt columns summed over the local heads: `[b, R, P]` per layer and micro-batch.
For a vision-language model the prompt columns include the image-pad tokens (the
vision span, token_weights/context.py) and the forward gets the micro-batch's images.

Parallelism: under TP each rank holds `heads / tp` query heads (its head sums are
partial); under PP each stage holds some layers. One all-reduce (sum) over the
model-parallel group (TP x PP) of the stacked `[k, b, R, P]` adds the TP head sums
and fills every layer slot from the stage that owns it; dividing by the total head
count gives the head-averaged rows on every rank.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_rl.models.forward import final_hidden_states, language_model


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (a vision-language model's language
    model: its decoder holds the layers whose rows are read; image tokens are prompt columns)."""
    return language_model(model)


def selected_layer_numbers(num_layers: int, last_k: int) -> list[int]:
    """Global 1-based layer numbers of the last k layers (0 or k >= num_layers: all)."""
    k = num_layers if last_k <= 0 or last_k >= num_layers else last_k
    return list(range(num_layers - k + 1, num_layers + 1))


def local_attention_layers(model) -> dict[int, torch.nn.Module]:
    """{global layer number: core attention module} for the layers of this PP stage."""
    m = unwrap(model)
    decoder = getattr(m, "decoder", None)
    if decoder is None:
        raise TypeError(f"{type(m).__name__} has no `decoder`; expected a Megatron-Core GPTModel")
    return {int(layer.layer_number): layer.self_attention.core_attention for layer in decoder.layers}


def response_rows(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  prompt_len: int, scale: float, row_chunk: int = 512) -> torch.Tensor:
    """Head-summed attention probabilities `[b, R, P]` (float32) of the response queries
    over the prompt keys, normalised over all keys as the layer's softmax is.

    query `[s, b, np, hn]`, key `[s, b, ng, hn]` (Megatron's sbhd layout, grouped kv heads
    allowed); attention_mask `[b or 1, 1, s, s]` with True = masked, or None = causal.
    """
    s, b, nh, hn = query.shape
    ng = key.shape[2]
    if nh % ng:
        raise ValueError(f"query has {nh} heads, key {ng} groups; expected a multiple")
    k = key.float().permute(1, 2, 0, 3)                                 # [b, ng, s, hn]
    if ng != nh:
        k = k.repeat_interleave(nh // ng, dim=1)                        # [b, np, s, hn]
    resp = s - prompt_len
    out = torch.empty(b, resp, prompt_len, dtype=torch.float32, device=query.device)
    cols = torch.arange(s, device=query.device)
    for r0 in range(0, resp, row_chunk):
        r1 = min(resp, r0 + row_chunk)
        q = query[prompt_len + r0: prompt_len + r1].float().permute(1, 2, 0, 3)   # [b, np, c, hn]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale                     # [b, np, c, s]
        if attention_mask is None:
            rows = torch.arange(prompt_len + r0, prompt_len + r1, device=query.device)
            masked = (cols[None, :] > rows[:, None])[None, None]
        else:
            masked = attention_mask[:, :, prompt_len + r0: prompt_len + r1].bool()
        scores = scores.masked_fill(masked, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        out[:, r0:r1] = probs[..., :prompt_len].sum(dim=1)
        del scores, probs
    return out


def _scale_of(core_attention, head_dim: int) -> float:
    scale = getattr(core_attention, "softmax_scale", None)
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


@contextmanager
def capture_rows(model, layer_numbers: list[int], prompt_len: int, row_chunk: int = 512
                 ) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward of a selected local layer stores its head-summed
    response rows in the yielded dict under the layer's global number."""
    found: dict[int, torch.Tensor] = {}
    handles = []
    for number, core in local_attention_layers(model).items():
        if number not in layer_numbers:
            continue

        def hook(module, args, kwargs, number=number):
            query, key = args[0], args[1]
            mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
            if kwargs.get("packed_seq_params") is not None:
                raise ValueError("attention rows need padded (not packed) micro-batches")
            found[number] = response_rows(query.detach(), key.detach(), mask, prompt_len,
                                          _scale_of(module, query.shape[-1]), row_chunk)

        handles.append(core.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def _model_parallel_group():
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_world_size() * mpu.get_pipeline_model_parallel_world_size() == 1:
        return None
    return mpu.get_model_parallel_group()


@torch.no_grad()
def attention_rows(model, mb: dict[str, torch.Tensor], layer_numbers: list[int],
                   forward_fn: Callable, row_chunk: int = 512) -> torch.Tensor:
    """Head-averaged rows `[k, b, R, P]` (float32) of the k selected layers for one
    micro-batch (`make_microbatches` layout), identical on every rank of the
    model-parallel group.

    forward_fn(model, mb) is the actor's forward (e.g. `Policy._forward`, which keeps
    per-sample steering); it runs through Megatron's schedule, so PP stages exchange
    activations as in the log-prob pass.
    """
    from megatron_rl.models.schedule import run_microbatches

    m = unwrap(model)
    prompt_len = int(mb["prompt_len"])
    b, s = mb["input_ids"].shape
    was_training = model.training
    model.eval()
    # rows need no logits: final_hidden_states skips the [b, s, vocab] projection
    with capture_rows(m, layer_numbers, prompt_len, row_chunk) as found, final_hidden_states(m):
        run_microbatches([model], [mb], forward_fn, lambda _mb, out: (out.sum() * 0, {}), forward_only=True)
    model.train(was_training)
    stacked = torch.zeros(len(layer_numbers), b, s - prompt_len, prompt_len, dtype=torch.float32,
                          device=mb["input_ids"].device)
    for i, number in enumerate(layer_numbers):
        if number in found:
            stacked[i] = found[number]
    group = _model_parallel_group()
    if group is not None:
        dist.all_reduce(stacked, group=group)
    return stacked / m.config.num_attention_heads
