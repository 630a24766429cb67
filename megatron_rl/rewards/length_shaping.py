"""DAPO's length handling of training rollouts, applied right after scoring:

- overlong shaping (`reward.overlong.buffer_len > 0`): each score gets DAPO's linear
  penalty for a response within `buffer_len` tokens of `rollout.max_new_tokens`
  (`rewards.dapo.overlong_penalty`); `token_rewards` and `sample["score"]` carry the
  shaped score, so dynamic sampling and advantages see it.
- truncation masking (`algos.mask_truncated`): a response cut by the length limit (it has
  `max_new_tokens` tokens and does not end in EOS) leaves the loss: its `response_mask`
  row is zeroed. Its score still enters its group's statistics, as in verl.

Validation rewards are never shaped. Responses are counted in tokens of the loss mask
before any masking.
"""
from __future__ import annotations

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.logging.values import MeanOver
from megatron_rl.rewards.dapo import overlong_penalty
from megatron_rl.rewards.token_rewards import to_token_rewards


def truncated_rows(batch: Batch, max_new_tokens: int, eos_ids: list[int]) -> torch.Tensor:
    """[B] bool: responses of `max_new_tokens` tokens whose last token is not an EOS id (a
    stop string that ends exactly at the limit counts as truncated)."""
    mask = batch["response_mask"] > 0
    lengths = mask.sum(-1)
    ids = batch["response_ids"]
    last = torch.where(lengths > 0, lengths - 1, torch.zeros_like(lengths))
    last_tok = ids.gather(1, last[:, None].long()).squeeze(1)
    ended = torch.isin(last_tok, torch.as_tensor(eos_ids, dtype=last_tok.dtype))
    return (lengths >= max_new_tokens) & ~ended


def shape_overlong(batch: Batch, scores: list[float], max_new_tokens: int, buffer_len: int,
                   penalty_factor: float) -> tuple[list[float], dict[str, float]]:
    """Scores plus DAPO's overlong penalty; rewrites `token_rewards` and `sample["score"]`."""
    lengths = (batch["response_mask"] > 0).sum(-1).tolist()
    penalties = [overlong_penalty(n, max_new_tokens, buffer_len, penalty_factor) for n in lengths]
    shaped = [s + p for s, p in zip(scores, penalties)]
    batch["token_rewards"] = to_token_rewards(shaped, batch["response_mask"])
    for sample, s, p in zip(batch.samples, shaped, penalties):
        sample["score"] = s
        sample["overlong_penalty"] = p
    metrics = {"reward/overlong_penalty_mean": MeanOver.of(penalties),
               "reward/overlong_frac": MeanOver.of([float(p < 0) for p in penalties]),
               "reward/shaped_mean": MeanOver.of(shaped)}
    return shaped, metrics


def mask_truncated(batch: Batch, max_new_tokens: int, eos_ids: list[int]) -> dict[str, float]:
    cut = truncated_rows(batch, max_new_tokens, eos_ids)
    batch["response_mask"] = batch["response_mask"] * (~cut).to(batch["response_mask"].dtype)[:, None]
    for sample, c in zip(batch.samples, cut.tolist()):
        sample["truncated"] = c
    return {"response_length/truncated_frac": MeanOver.of(cut.float().tolist())}


def apply_length_shaping(cfg, tokenizer, batch: Batch, scores: list[float]) -> dict[str, float]:
    """Both of the above as configured (module docstring); no-op when both are off."""
    metrics: dict[str, float] = {}
    limit = cfg.rollout.max_new_tokens
    ov = cfg.reward.overlong
    if ov.buffer_len > 0:
        _, m = shape_overlong(batch, scores, limit, ov.buffer_len, ov.penalty_factor)
        metrics.update(m)
    if cfg.algos.mask_truncated:
        from megatron_rl.rollout.native_engine import eos_token_ids
        metrics.update(mask_truncated(batch, limit, eos_token_ids(tokenizer)))
    return metrics
