"""Intervention math on the sae-lens fixture SAEs (d_in 16), independent of any model."""
from pathlib import Path

import pytest
import torch

from megatron_rl.steering import INTERVENTIONS, build_intervention, load_sae

FIX = Path(__file__).parent / "fixtures"
CASES = sorted(p.name for p in FIX.iterdir() if (p / "cfg.json").is_file())


def _h(seed=0):
    return torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(seed)) * 2.0   # [S, B, H]


def test_registry_has_the_four_modes():
    assert set(INTERVENTIONS) >= {"add", "clamp", "direction_clamp", "global"}


@pytest.mark.parametrize("case", CASES)
def test_clamp_to_current_activation_is_identity(case):
    sae, h = load_sae(FIX / case), _h()
    feats = [0, 7, 19]
    iv = build_intervention("clamp", sae, feature_idxs=feats, max_activations=[2.0, 0.5, 1.0])
    current = sae.encode(h)[..., feats]                       # per position: [S, B, F]
    out = iv.apply(h, current / iv.max_act)
    assert (out - h).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_partial_encode_equals_full_encode(case):
    sae, h = load_sae(FIX / case), _h(3)
    idx = torch.tensor([1, 8, 30])
    assert torch.allclose(sae.encode_features(h, idx)[0], sae.encode(h)[..., idx], atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_clamp_equals_full_decode_with_error_term(case):
    """The shortcut h + decode_delta equals the definition decode(f') + (h - decode(f))."""
    sae, h = load_sae(FIX / case), _h(1)
    iv = build_intervention("clamp", sae, feature_idxs=[4], max_activations=[3.0])
    out = iv.apply(h, torch.full((1, 3, 1), 2.0))
    f, state = sae.encode_with_state(h)
    f2 = f.clone()
    f2[..., 4] = 6.0
    assert (out - (sae.decode(f2, state) + h - sae.decode(f, state))).abs().max() < 1e-5
    assert (out - h).abs().max() > 1e-2


def test_add_is_the_decoder_row_times_strength_times_max_activation():
    sae, h = load_sae(FIX / "standard"), _h()
    iv = build_intervention("add", sae, feature_idxs=[2, 9], max_activations=[2.0, 3.0])
    s = torch.tensor([[[1.0, 0.0], [0.0, -1.0], [0.5, 0.5]]])      # [1, B, F]
    out = iv.apply(h, s)
    want = h + torch.stack([2.0 * sae.W_dec[2], -3.0 * sae.W_dec[9], sae.W_dec[2] + 1.5 * sae.W_dec[9]])
    assert (out - want).abs().max() < 1e-6


def test_direction_clamp_sets_the_projection_and_keeps_the_rest():
    sae, h = load_sae(FIX / "jumprelu"), _h(2)
    iv = build_intervention("direction_clamp", sae, feature_idxs=[5], max_activations=[2.0])
    d = sae.W_dec[5] / sae.W_dec[5].norm()
    out = iv.apply(h, torch.full((1, 3, 1), 1.5))
    assert ((out @ d) - 3.0).abs().max() < 1e-5
    perp = lambda x: x - (x @ d).unsqueeze(-1) * d                 # noqa: E731
    assert (perp(out) - perp(h)).abs().max() < 1e-5
    same = iv.apply(h, (h @ d).unsqueeze(-1) / 2.0)                # clamp to the current projection
    assert (same - h).abs().max() < 1e-5


def test_unknown_mode_and_bad_features_are_errors():
    sae = load_sae(FIX / "standard")
    with pytest.raises(ValueError, match="steering.mode='steer'"):
        build_intervention("steer", sae, feature_idxs=[1])
    with pytest.raises(ValueError, match=r"\[40\] out of range.*d_sae=32"):
        build_intervention("add", sae, feature_idxs=[1, 40])
    with pytest.raises(ValueError, match="max_activations has 1 entries but feature_idxs has 2"):
        build_intervention("add", sae, feature_idxs=[1, 2], max_activations=[1.0])
