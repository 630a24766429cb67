"""Input validation shared by the algos: NaN/inf guards and shape checks.

A NaN reward or log-prob silently poisons a whole update (0 * NaN = NaN in every
masked sum), so inputs are checked and the error names the argument. The check
costs one device sync per tensor; `set_finite_checks(False)` turns it off for
production GPU runs that have been validated.
"""
from __future__ import annotations

import torch

_CHECK_FINITE = True


def set_finite_checks(enabled: bool) -> None:
    global _CHECK_FINITE
    _CHECK_FINITE = bool(enabled)


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first argument that holds NaN or inf."""
    if not _CHECK_FINITE:
        return
    for name, t in tensors.items():
        if t is None or not torch.is_tensor(t) or not t.is_floating_point():
            continue
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            raise ValueError(f"'{name}' contains NaN or inf (first at index {bad}, "
                             f"value {t.detach()[tuple(bad)].item()})")


def check_same_shape(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"'{name}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)} "
                             f"(the shape of '{ref_name}')")
