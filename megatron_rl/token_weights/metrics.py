"""Summary statistics of the token weights a step trains with."""
from __future__ import annotations

import torch


def token_weight_metrics(weights: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor | None = None,
                         unclipped: torch.Tensor | None = None, clip: tuple[float, float] | None = None
                         ) -> dict[str, float]:
    """`token_weights/{mean,std,min,max}` over valid tokens (mask > 0); `/clip_frac`, the
    share of valid tokens whose `unclipped` weight fell outside `clip`; `/adv_corr`, the
    Pearson correlation of weights with advantages over valid tokens (0 when either is
    constant: with GRPO, advantages are constant within a sequence, so this says whether
    up-weighted tokens sit in better or worse responses)."""
    valid = mask > 0
    if not bool(valid.any()):
        return {}
    w = weights[valid].double()
    out = {"token_weights/mean": w.mean().item(), "token_weights/std": w.std(unbiased=False).item(),
           "token_weights/min": w.min().item(), "token_weights/max": w.max().item()}
    if unclipped is not None and clip is not None:
        u = unclipped[valid]
        out["token_weights/clip_frac"] = ((u < clip[0]) | (u > clip[1])).double().mean().item()
    if advantages is not None:
        out["token_weights/adv_corr"] = _corr(w, advantages[valid].double())
    return out


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / den) if den > 0 else 0.0
