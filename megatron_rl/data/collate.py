"""Stack dataset samples into a `Batch` with left-padded prompts."""
from __future__ import annotations

from typing import Any

import torch

from megatron_rl.data.batch import Batch


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id where it has no pad token."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither pad_token_id nor eos_token_id")


def collate_prompts(samples: list[dict[str, Any]], pad_id: int) -> Batch:
    """`prompt_ids`/`prompt_mask` [B, P] left-padded to the longest prompt; every other
    field of each sample (uid, ground_truth, ...) goes to `Batch.samples`."""
    if not samples:
        raise ValueError("collate_prompts got an empty list of samples")
    width = max(len(s["prompt_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        p = s["prompt_ids"]
        if p:
            ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    records = [{k: v for k, v in s.items() if k != "prompt_ids"} for s in samples]
    return Batch({"prompt_ids": ids, "prompt_mask": mask}, records)
