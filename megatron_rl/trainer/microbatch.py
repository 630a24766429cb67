"""Turning a rolled-out `Batch` into model inputs and micro-batches.

The model sees `prompt ++ response` (left-padded prompt, right-padded response);
the logits at positions P-1 .. P+R-2 score the response tokens. Padded micro-batches
(`make_microbatches`) all have the same shape (Megatron's pipeline schedule needs it):
a short last one is padded with zero-weight copies of its first row.

Packed micro-batches (`make_packed_microbatches`, `actor.max_tokens_per_microbatch > 0`)
hold the real tokens of whole rows as one `[1, T]` stream (models/packing.py), while every
per-token training tensor stays in the rows' `[n, R]` response layout: per-token outputs
computed on the stream are scattered there, so loss aggregation is the padded path's.

`trim_padding` cuts a padded micro-batch to the columns some row uses (Policy, PP=1 only:
the pipeline schedule needs one shape; the collated batch is already cut to its own longest
prompt and response, so this only helps where a micro-batch's rows are all shorter).

A padded micro-batch of image prompts also holds `images`, an `ImageBatch` of its rows'
`sample["images"]` in row order (data/multimodal.py); packing refuses images (Policy).
"""
from __future__ import annotations

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.data.multimodal import ImageBatch
from megatron_rl.models.packing import pack_sequences, plan_microbatches

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
              "row_valid": (torch.arange(micro_batch_size) < real).float(), "batch_rows": t,
              "prompt_len": torch.tensor(batch["prompt_ids"].shape[1])}
        for k in PER_TOKEN_KEYS:
            if k in batch:
                mb[k] = batch[k][t].float()
        if "steer_strengths" in batch:
            mb["steer_strengths"] = batch["steer_strengths"][t].float()
        images = ImageBatch.from_samples([batch.samples[i].get("images") for i in idx])   # filler rows too
        if images is not None:
            mb["images"] = images
        mb["response_mask"] = mb["response_mask"] * mb["row_valid"][:, None]
        mbs.append(mb)
    return mbs


def trim_padding(mb: dict) -> dict:
    """`mb` without its leading all-pad prompt columns and trailing response columns that no row
    attends to or scores; `prompt_len` and the `[b, R]` tensors follow. Log-probs are unchanged:
    positions count real tokens (`position_ids_from_mask`) and no real token attends to a pad
    column; `response_width` keeps the padded R for losses that divide by it. Not for image prompts (M-RoPE ids and image features are laid out per padded row)."""
    am, p, r = mb["attention_mask"], int(mb["prompt_len"]), mb["labels"].shape[1]
    used = am.bool().any(0)
    lead = min(int(used[:p].long().argmax()) if bool(used[:p].any()) else p, p - 1)   # keep position p-1
    resp_used = used[p:] | (mb["response_mask"] != 0).any(0)
    tail = int(resp_used.nonzero().max()) + 1 if bool(resp_used.any()) else 1
    if lead == 0 and tail == r:
        return mb
    out = dict(mb)
    out["input_ids"], out["attention_mask"] = mb["input_ids"][:, lead:p + tail], am[:, lead:p + tail]
    out["labels"] = mb["labels"][:, :tail]
    for k in PER_TOKEN_KEYS:
        if k in mb:
            out[k] = mb[k][:, :tail]
    out["prompt_len"] = torch.tensor(p - lead)
    out["response_width"] = torch.tensor(r)        # the padded R (Dr.GRPO's default norm_len)
    return out


def make_packed_microbatches(batch: Batch, max_tokens: int, *, pad_to: int | None = None,
                             pad_to_multiple_of: int = 1, seq_multiple: int = 1) -> list[dict]:
    """Token-budget micro-batches of whole rows (first-fit decreasing), real tokens only.

    Each dict has `packed` (a PackedBatch), `input_ids` `[1, T]`, `rows` (the batch rows it
    holds, `[n]`), the padded path's per-row tensors for those rows (`labels`,
    `response_mask`, ... `[n, R]`) and the scoring index `score_pos`/`score_row`/`score_col`/
    `score_labels` `[K]`: stream position t's logits score response token
    `(score_row, score_col)`, the next real token of the same sequence. `seq_multiple` pads
    each sequence to a multiple of it (context parallelism: 2*cp); the budget counts those pads.
    """
    ids, am = model_inputs(batch)
    lengths = am.sum(-1)
    if seq_multiple > 1:
        lengths = -(-lengths // seq_multiple) * seq_multiple
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > max_tokens:
        row = int(lengths.argmax())
        raise ValueError(f"actor.max_tokens_per_microbatch={max_tokens} is smaller than row {row} of the batch "
                         f"({longest} real prompt + response tokens); a sequence is never split across "
                         f"micro-batches, so the budget must be >= data.max_prompt_length + "
                         f"rollout.max_new_tokens")
    p = batch["prompt_ids"].shape[1]
    mbs = []
    for rows in plan_microbatches(lengths.tolist(), max_tokens):
        pk = pack_sequences(ids, am, rows, pad_to=pad_to, pad_to_multiple_of=pad_to_multiple_of,
                            seq_multiple=seq_multiple)
        t = torch.as_tensor(rows)
        mb = {"packed": pk, "input_ids": pk.input_ids, "rows": t, "labels": batch["response_ids"][t],
              "prompt_len": torch.tensor(p)}
        for k in PER_TOKEN_KEYS:
            if k in batch:
                mb[k] = batch[k][t].float()
        mb.update(_scoring_index(pk, t, p))
        mbs.append(mb)
    return mbs


def _scoring_index(pk, rows: torch.Tensor, prompt_len: int) -> dict[str, torch.Tensor]:
    """Stream positions whose next token (same sequence) is a response token, and where
    that token lives in the micro-batch's `[n, R]` response layout."""
    seg = pk.segment_ids()
    nxt_row, nxt_col = pk.rows[1:], pk.cols[1:]
    sel = (seg[1:] == seg[:-1]) & (nxt_row >= 0) & (nxt_col >= prompt_len)
    local = torch.full((pk.padded_shape[0],), -1, dtype=torch.long)
    local[rows] = torch.arange(len(rows))
    pos = sel.nonzero()[:, 0]
    return {"score_pos": pos, "score_row": local[nxt_row[sel]], "score_col": nxt_col[sel] - prompt_len,
            "score_labels": pk.input_ids[0, pos + 1]}


def scatter_rows(values: torch.Tensor, mb: dict) -> torch.Tensor:
    """Per-scored-token values `[K]` into the micro-batch's `[n, R]` layout (0 elsewhere);
    differentiable in `values`."""
    n, r = mb["labels"].shape
    return values.new_zeros(n, r).index_put((mb["score_row"], mb["score_col"]), values)


def move_microbatch(mb: dict, device) -> dict:
    return {k: v.to(device) for k, v in mb.items()}


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
