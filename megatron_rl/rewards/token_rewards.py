"""Place sequence scores on tokens.

torch is imported on use: reward worker processes import this package, and their
start-up time should not include torch's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


def to_token_rewards(scores: Sequence[float] | torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, R] float: each row's score on its last valid response token (mask > 0), zero
    elsewhere. A row with an empty response gets nothing (its score cannot be placed)."""
    import torch

    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, R], got shape {tuple(response_mask.shape)}")
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.shape != (response_mask.shape[0],):
        raise ValueError(f"{tuple(scores.shape)} scores for a response_mask of shape {tuple(response_mask.shape)}")
    dtype = response_mask.dtype if response_mask.is_floating_point() else torch.float32
    valid = response_mask > 0
    R = response_mask.shape[1]
    # index of the last valid token: the largest position where mask > 0
    last = torch.where(valid, torch.arange(R, device=response_mask.device), -1).max(dim=1).values
    out = torch.zeros(response_mask.shape, dtype=dtype, device=response_mask.device)
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] = scores.to(dtype=dtype, device=response_mask.device)[rows]
    return out
