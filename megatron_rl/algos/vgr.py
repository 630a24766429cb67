"""VGR token weights: up-weight response tokens grounded in the context, not the instruction.

For each response token t, from the attention of t over the prompt:
  A_ctx(t), A_ins(t) = attention mass on context / instruction prompt tokens
  VGR_t = (A_ins/|I|) / (A_ctx/|C| + 1e-6),   w_t = 1 / (VGR_t + 1e-6)
then optional Gaussian smoothing along the response, division by the per-sequence
mean over valid tokens, and clipping. Tokens that read mostly the instruction get
small weights; tokens that read the context get large ones. A prompt without context
tokens has nothing to ground on and gets weights 1.

This module is the one implementation of that math: the `token_weights/` phase only
supplies the attention rows and the context/instruction masks, and calls it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _bos_columns(rows: torch.Tensor, prompt_mask: torch.Tensor | None) -> torch.Tensor:
    """Column of each prompt's first real token `[batch]`.

    From `prompt_mask` when given; otherwise the first column that receives any
    attention (left padding receives exactly zero attention), i.e. column 0 for
    unpadded prompts.
    """
    if prompt_mask is not None:
        return (prompt_mask > 0).float().argmax(-1)
    received = rows.sum(dim=1) > 0  # [batch, prompt_len]
    return received.float().argmax(-1)


def _forward_fill(w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace invalid positions by the nearest preceding valid value (the first valid for leading ones)."""
    r = w.shape[1]
    pos = torch.arange(r, device=w.device).expand_as(w)
    idx = torch.where(valid, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    first = torch.where(valid, pos, torch.full_like(pos, r)).min(dim=1, keepdim=True).values.clamp(max=r - 1)
    idx = torch.where(idx < 0, first.expand_as(idx), idx)
    return w.gather(1, idx)


def clip_token_weights(w: torch.Tensor, response_mask: torch.Tensor,
                       clip: tuple[float, float] | None) -> torch.Tensor:
    """`w` clamped to `clip` (None: unchanged) and zeroed off `response_mask`; separate from
    `vgr_token_weights` so a caller can keep the unclipped weights (clip-fraction metrics)."""
    if clip is None:
        return w
    return w.clamp(min=clip[0], max=clip[1]) * (response_mask > 0).to(w.dtype)


def gaussian_smooth(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth `[batch, len]` along dim 1; kernel half-width max(1, int(3 sigma)), replicate padding."""
    half = max(1, int(3 * sigma))
    x = torch.arange(-half, half + 1, dtype=w.dtype, device=w.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = torch.nn.functional.pad(w.unsqueeze(1), (half, half), mode="replicate")
    return torch.nn.functional.conv1d(padded, kernel.view(1, 1, -1)).squeeze(1)


@torch.no_grad()
def vgr_token_weights(attentions: Sequence[torch.Tensor], context_mask: torch.Tensor,
                      instruction_mask: torch.Tensor, response_mask: torch.Tensor,
                      last_k: int | None = None, smooth_sigma: float = 0.0,
                      clip: tuple[float, float] | None = (0.2, 3.0),
                      prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token weights `[batch, response_len]` (float32, 0 on invalid response positions).

    attentions: one tensor per layer, `[batch, heads, response_len, prompt_len]`: the
        attention probabilities of each response token (query) over the prompt columns
        (keys), i.e. the prompt-column slice of the response rows of the full attention
        matrix, with the prompt in its (left-padded) batch layout.
    context_mask, instruction_mask: `[batch, prompt_len]`, 1 on context / instruction tokens.
    response_mask: `[batch, response_len]`.
    last_k: average the last k layers (None: all).
    BOS: the column of each prompt's first real token (an attention sink) is zeroed before
        rows are renormalised over the prompt columns; `prompt_mask` locates it when
        given, else the first column that receives attention (column 0 if unpadded).
    Sequences are normalised to mean 1 over their valid tokens, then clipped to `clip`.
    A prompt with no instruction tokens, or no context tokens, gives uniform weights 1.
    """
    if not attentions:
        raise ValueError("attentions is empty; expected one [batch, heads, response_len, prompt_len] per layer")
    layers = list(attentions)[-last_k:] if last_k else list(attentions)
    batch, _, resp_len, prompt_len = layers[0].shape
    for i, a in enumerate(layers):
        if a.dim() != 4 or a.shape[0] != batch or a.shape[2:] != (resp_len, prompt_len):
            raise ValueError(f"attentions[{i}] has shape {tuple(a.shape)}, expected "
                             f"[{batch}, heads, {resp_len}, {prompt_len}]")
    for name, m, shape in (("context_mask", context_mask, (batch, prompt_len)),
                           ("instruction_mask", instruction_mask, (batch, prompt_len)),
                           ("response_mask", response_mask, (batch, resp_len))):
        if tuple(m.shape) != shape:
            raise ValueError(f"'{name}' has shape {tuple(m.shape)}, expected {shape}")

    device = layers[0].device
    ctx = (context_mask > 0).float().to(device)
    ins = (instruction_mask > 0).float().to(device)
    if prompt_mask is not None:
        prompt_mask = prompt_mask.to(device)
    a_ctx = torch.zeros(batch, resp_len, device=device)
    a_ins = torch.zeros(batch, resp_len, device=device)
    for a in layers:
        rows = a.detach().float().mean(dim=1)  # heads averaged: [batch, resp, prompt]
        bos = _bos_columns(rows, prompt_mask)
        rows = rows.scatter(2, bos.view(batch, 1, 1).expand(batch, resp_len, 1), 0.0)
        total = rows.sum(-1, keepdim=True)
        rows = rows / torch.where(total > 0, total, torch.ones_like(total))
        a_ctx += torch.einsum("brp,bp->br", rows, ctx)
        a_ins += torch.einsum("brp,bp->br", rows, ins)
    a_ctx /= len(layers)
    a_ins /= len(layers)

    n_ctx = ctx.sum(-1, keepdim=True).clamp_min(1)
    n_ins = ins.sum(-1, keepdim=True).clamp_min(1)
    vgr = (a_ins / n_ins) / (a_ctx / n_ctx + 1e-6)
    w = 1.0 / (vgr + 1e-6)

    valid = response_mask.to(device) > 0
    if smooth_sigma > 0:
        w = gaussian_smooth(_forward_fill(w, valid), smooth_sigma)
    validf = valid.float()
    mean = (w * validf).sum(-1, keepdim=True) / validf.sum(-1, keepdim=True).clamp_min(1)
    w = w / torch.where(mean > 0, mean, torch.ones_like(mean))
    # no context: VGR is ~1e6 x instruction attention, noise normalised to mean 1, so weights 1
    w = torch.where(ctx.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    return clip_token_weights(w * validf, valid, clip).to(response_mask.device)
