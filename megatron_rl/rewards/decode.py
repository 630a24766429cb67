"""Responses as text for the rewards: one batched decode instead of one call per row.

`tokenizer.decode` per row cost ~0.1 ms of Python per 256-token row around the Rust decode
(`to_py_obj` walks every id), i.e. ~60 ms for 512 rows on the CPU here; transformers'
`batch_decode` loops over the same `decode`. A fast tokenizer's backend decodes the whole
batch in one call (threads in Rust), which is what `decode_responses` uses whenever it gives
the same text (no `clean_up_tokenization_spaces`); otherwise it falls back to `decode`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_rl.data.batch import Batch


def response_token_lists(batch: "Batch") -> list[list[int]]:
    """Each row's response ids where `response_attention_mask` (else `response_mask`) > 0."""
    import torch

    ids, mask = batch["response_ids"], batch.get("response_attention_mask")
    keep = (mask if mask is not None else batch["response_mask"]) > 0
    lengths = keep.sum(-1)
    if torch.equal(keep, torch.arange(keep.shape[1], device=keep.device)[None] < lengths[:, None]):
        return [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]      # right-padded: one copy
    return [ids[i][keep[i]].tolist() for i in range(len(batch))]               # holes (e.g. tool tokens)


def decode_texts(tokenizer, rows: list[list[int]]) -> list[str]:
    """`tokenizer.decode(row, skip_special_tokens=True)` for every row, batched when equal."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch") and \
            getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return backend.decode_batch(rows, skip_special_tokens=True)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def decode_responses(tokenizer, batch: "Batch") -> list[str]:
    return decode_texts(tokenizer, response_token_lists(batch))
