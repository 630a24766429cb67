"""Steered vs unsteered generations of the same prompts: how much steering changes the output."""
from __future__ import annotations

import torch


def frac_tokens_changed(steered_ids: torch.Tensor, steered_mask: torch.Tensor, base_ids: torch.Tensor,
                        base_mask: torch.Tensor) -> float:
    """Fraction of generated positions whose token differs between two decodes of the same prompts.

    Positions run over the longer of the two responses of each row; a position one response has
    and the other lacks (it stopped earlier) counts as changed. `*_ids`/`*_mask`: `[B, R]` and
    `[B, R']` right-padded (widths may differ).
    """
    if steered_ids.shape[0] != base_ids.shape[0]:
        raise ValueError(f"frac_tokens_changed: {steered_ids.shape[0]} steered rows vs {base_ids.shape[0]} base rows")
    width = max(steered_ids.shape[1], base_ids.shape[1])

    def pad(t, fill):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    a_ids, b_ids = pad(steered_ids.long(), -1), pad(base_ids.long(), -1)
    a_on, b_on = pad(steered_mask.float(), 0.0) > 0, pad(base_mask.float(), 0.0) > 0
    counted = a_on | b_on
    changed = counted & ((a_on != b_on) | (a_ids != b_ids))
    n = int(counted.sum())
    return float(changed.sum()) / n if n else 0.0
