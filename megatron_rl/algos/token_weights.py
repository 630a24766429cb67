"""Per-token loss weights `[batch, response_len]` and where they apply.

Weights stay floating point end to end (an integer cast silently turns 0.5 into 0).

Where a weight applies is an explicit choice, `token_weights_apply_to`:
  "pg"   (default) the weight multiplies the per-token policy-gradient term only; the
         KL and entropy terms and every denominator (token count, sequence length) are
         unchanged. This is what the original TRL implementation does by scaling the
         advantages.
  "mask" the weight multiplies the loss mask, so it scales the KL and entropy terms
         too and changes the denominators (token-mean divides by the sum of weights).
         This is the behaviour of the EasyR1 port.
`apply_token_weights` turns (mask, weights, apply_to) into the two tensors every loss
needs, so the trainer, the fused kernels and their torch reference agree:
    pg_weight, loss_mask = apply_token_weights(response_mask, token_weights, apply_to)
    pg_loss  = agg_loss(pg_losses * pg_weight, loss_mask, mode)
    kl_loss  = agg_loss(kl, loss_mask, mode);  entropy = agg_loss(ent, loss_mask, mode)
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_rl.algos.checks import check_finite, check_same_shape

APPLY_TO = ("pg", "mask")


def align_token_weights(weights: torch.Tensor | Sequence, response_len: int,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weights as a float CPU tensor `[batch, response_len]`: rows padded with 1.0 or truncated.

    Accepts a 2-D tensor, a list of 1-D tensors or a list of lists (ragged rows allowed).
    Integer inputs are converted to float, never the other way round.
    """
    dtype = dtype or torch.get_default_dtype()
    if torch.is_tensor(weights):
        if weights.dim() != 2:
            raise ValueError(f"token_weights tensor must be [batch, len], got shape {tuple(weights.shape)}")
        rows = list(weights)
    else:
        rows = list(weights)
    out = torch.ones(len(rows), response_len, dtype=dtype)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row).detach().to(device="cpu").to(dtype).reshape(-1)
        n = min(row.numel(), response_len)
        out[i, :n] = row[:n]
    check_finite(token_weights=out)
    return out


def apply_token_weights(mask: torch.Tensor, token_weights: torch.Tensor | None,
                        apply_to: str = "pg") -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(pg_weight, loss_mask)`, both float `[batch, response_len]`.

    "pg":   pg_weight = token_weights, loss_mask = mask.
    "mask": pg_weight = 1,             loss_mask = mask * token_weights.
    With no weights: (ones, mask). Weights must be finite and >= 0.
    """
    if apply_to not in APPLY_TO:
        raise ValueError(f"token_weights_apply_to must be one of {APPLY_TO}, got '{apply_to}'")
    dtype = mask.dtype if mask.is_floating_point() else torch.get_default_dtype()
    mask = mask.to(dtype)
    ones = torch.ones_like(mask)
    if token_weights is None:
        return ones, mask
    check_same_shape("response_mask", mask, token_weights=token_weights)
    if not token_weights.is_floating_point():
        token_weights = token_weights.to(dtype)
    check_finite(token_weights=token_weights)
    if bool((token_weights < 0).any()):
        raise ValueError("token_weights must be >= 0 (a negative weight flips the gradient sign)")
    token_weights = token_weights.to(dtype)
    if apply_to == "pg":
        return token_weights, mask
    return ones, mask * token_weights
