"""Turning a rolled-out `Batch` into model inputs and micro-batches.

The model sees `prompt ++ response` (left-padded prompt, right-padded response);
the logits at positions P-1 .. P+R-2 score the response tokens. Micro-batches all
have the same shape (Megatron's pipeline schedule needs it): a short last one is
padded with zero-weight copies of its first row.
"""
from __future__ import annotations

import torch

from megatron_rl.data.batch import Batch

PER_TOKEN_KEYS = ("old_logprob", "ref_logprob", "advantages", "response_mask", "token_weights",
                  "rollout_logprob", "returns", "values", "rollout_is_weights")


def model_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, P+R], attention_mask [B, P+R])."""
    resp_attn = batch.get("response_attention_mask")
    if resp_attn is None:
        resp_attn = (batch["response_mask"] > 0).long()
        if "info_mask" in batch:
            resp_attn = resp_attn | (batch["info_mask"] > 0).long()
    ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], 1)
    am = torch.cat([batch["prompt_mask"].long(), resp_attn.long()], 1)
    return ids, am


def make_microbatches(batch: Batch, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    ids, am = model_inputs(batch)
    n = len(batch)
    mbs = []
    for start in range(0, n, micro_batch_size):
        idx = list(range(start, min(start + micro_batch_size, n)))
        real = len(idx)
        idx += [idx[0]] * (micro_batch_size - real)
        t = torch.as_tensor(idx)
        mb = {"input_ids": ids[t], "attention_mask": am[t], "labels": batch["response_ids"][t],
              "row_valid": (torch.arange(micro_batch_size) < real).float(),
              "prompt_len": torch.tensor(batch["prompt_ids"].shape[1])}
        for k in PER_TOKEN_KEYS:
            if k in batch:
                mb[k] = batch[k][t].float()
        if "steer_strengths" in batch:
            mb["steer_strengths"] = batch["steer_strengths"][t].float()
        mb["response_mask"] = mb["response_mask"] * mb["row_valid"][:, None]
        mbs.append(mb)
    return mbs


def response_logits(output: torch.Tensor, mb: dict, vocab_size: int) -> torch.Tensor:
    """Logits that score the response tokens: [b, R, V/tp], padded vocab columns at -inf."""
    p = int(mb["prompt_len"])
    r = mb["labels"].shape[1]
    logits = output[:, p - 1: p - 1 + r]
    return mask_padded_vocab(logits, vocab_size)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core import parallel_state as mpu

    v_local = logits.shape[-1]
    start = mpu.get_tensor_model_parallel_rank() * v_local
    if start + v_local <= vocab_size:
        return logits
    keep = (torch.arange(start, start + v_local, device=logits.device) < vocab_size)
    return logits.masked_fill(~keep, float("-inf"))
