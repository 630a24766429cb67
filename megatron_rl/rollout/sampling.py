"""Token sampling from full-vocabulary logits: temperature, top-k, top-p, greedy.

Log-probs are those of the temperature-scaled distribution *before* top-k/top-p
truncation, which is what the trainer recomputes; truncation only shapes the draw. So
does `suppress` (EOS before `min_new_tokens`): the draw never picks those tokens, the
log-prob stays the untruncated one.
"""
from __future__ import annotations

import torch

from megatron_rl.rollout.protocol import SamplingParams


def sample_tokens(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None,
                  suppress: list[int] | None = None):
    """logits [B, V] (float) -> (tokens [B] long, logprob [B] float32); `suppress`: token ids
    never drawn (their log-probs stay in the returned distribution)."""
    logits = logits.float()
    if sp.greedy or sp.temperature == 0.0:
        tok = _suppressed(logits, suppress).argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
        return tok, logp
    scaled = logits / sp.temperature
    logp_all = torch.log_softmax(scaled, -1)
    filt = _suppressed(scaled, suppress)
    if sp.top_k and sp.top_k > 0 and sp.top_k < filt.shape[-1]:
        kth = torch.topk(filt, sp.top_k, -1).values[:, -1:]
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, idx = torch.sort(filt, -1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        cum = probs.cumsum(-1)
        drop = cum - probs > sp.top_p           # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filt = torch.full_like(filt, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(filt, -1)
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, logp_all.gather(-1, tok[:, None])[:, 0]


def _suppressed(logits: torch.Tensor, ids: list[int] | None) -> torch.Tensor:
    """A copy of `logits` with `ids` at -inf (the same tensor when there are none)."""
    if not ids:
        return logits.clone()
    out = logits.clone()
    out[:, ids] = float("-inf")
    return out
