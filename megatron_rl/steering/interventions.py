"""Residual-stream interventions, registered by name (`INTERVENTIONS`).

Each intervention maps hidden states `h [..., d_in]` and strengths `s [..., n_strengths]`
(broadcast against `h[..., :1]`, so `[1, B, F]` against sequence-first `[S, B, H]`) to new
hidden states. Masking by scope and dtype handling live in the controller.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_rl.steering.sae import SAE

INTERVENTIONS: dict[str, type["Intervention"]] = {}


def register_intervention(name: str):
    def deco(cls):
        cls.name = name
        INTERVENTIONS[name] = cls
        return cls
    return deco


class Intervention:
    """Features `feature_idxs` of `sae`, their max activations `m_i` and default strengths."""

    name = "base"
    needs_encode = False       # whether apply() runs the SAE encoder (cost: two d_in x d_sae matmuls)

    def __init__(self, sae: SAE, feature_idxs: Sequence[int], max_activations: Sequence[float] | None = None,
                 strengths: Sequence[float] | None = None, global_strength: float = 1.0):
        n = len(feature_idxs)
        if n == 0:
            raise ValueError(f"steering mode {self.name!r} needs at least one feature in feature_idxs")
        bad = [i for i in feature_idxs if not 0 <= int(i) < sae.d_sae]
        if bad:
            raise ValueError(f"feature_idxs {bad} out of range for SAE {sae.source} with d_sae={sae.d_sae}")
        for key, vals in (("max_activations", max_activations), ("strengths", strengths)):
            if vals and len(vals) != n:
                raise ValueError(f"steering.{key} has {len(vals)} entries but feature_idxs has {n}")
        self.sae = sae
        self.idx = torch.as_tensor(list(feature_idxs), dtype=torch.long, device=sae.W_dec.device)
        self.max_act = torch.tensor(list(max_activations) if max_activations else [1.0] * n, dtype=sae.dtype,
                                    device=sae.W_dec.device)
        self.base_strengths = torch.tensor(list(strengths) if strengths else [1.0] * n, dtype=sae.dtype,
                                           device=sae.W_dec.device)
        self.global_strength = float(global_strength)

    @property
    def n_strengths(self) -> int:
        """Width F of the strengths tensor the controller passes (one per feature by default)."""
        return len(self.idx)

    def default_strengths(self) -> torch.Tensor:
        return self.base_strengths

    def directions(self) -> torch.Tensor:
        """Decoder rows of the steered features `[F, d_in]`."""
        return self.sae.W_dec[self.idx]

    def apply(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_intervention("add")
class AddFeatures(Intervention):
    """h + sum_i s_i * m_i * W_dec[f_i]."""

    def apply(self, h, s):
        return h + (s * self.max_act) @ self.directions()


@register_intervention("global")
class GlobalScale(Intervention):
    """h + g * sum_i s_i * m_i * W_dec[f_i]: the configured per-feature mix scaled by one strength g.

    The mix is fixed by `strengths`; only g varies per sample (n_strengths = 1).
    """

    @property
    def n_strengths(self) -> int:
        return 1

    def default_strengths(self):
        return torch.tensor([self.global_strength], dtype=self.sae.dtype, device=self.idx.device)

    def apply(self, h, s):
        return h + s * ((self.base_strengths * self.max_act) @ self.directions())


@register_intervention("clamp")
class ClampFeatures(Intervention):
    """Set SAE features f_i to s_i * m_i and keep the reconstruction error:
    decode(f') + (h - decode(f)). Clamping to the current activation returns h (up to rounding).

    Computed as h + decode(f') - decode(f) = h + scale((s m - f_idx) @ W_dec[idx]): the decoder is
    affine, so only the clamped features are encoded (all of them for topk) and nothing is decoded
    in full.
    """

    needs_encode = True

    def apply(self, h, s):
        f_idx, state = self.sae.encode_features(h, self.idx)
        return h + self.sae.decode_delta(s * self.max_act - f_idx, self.idx, state)


@register_intervention("direction_clamp")
class DirectionClamp(Intervention):
    """Without the SAE encoder: h - (h.d)d + d * s * m, d the unit decoder row (features in turn)."""

    def apply(self, h, s):
        d = self.directions()
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        target = s * self.max_act
        for i in range(d.shape[0]):
            di = d[i]
            h = h + (target[..., i:i + 1] - (h @ di).unsqueeze(-1)) * di
        return h


def build_intervention(mode: str, sae: SAE, **kwargs) -> Intervention:
    if mode not in INTERVENTIONS:
        raise ValueError(f"steering.mode={mode!r} unknown; expected one of {sorted(INTERVENTIONS)}")
    return INTERVENTIONS[mode](sae, **kwargs)

