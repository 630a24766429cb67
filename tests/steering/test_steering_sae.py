"""Our SAE math equals sae-lens' own (fixtures written by sae-lens, see make_fixtures.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.steering import load_sae
from megatron_rl.steering.sae import layer_from_hook_name

FIX = Path(__file__).parent / "fixtures"
CASES = sorted(p.name for p in FIX.iterdir() if (p / "cfg.json").is_file())


def test_fixtures_cover_every_architecture():
    archs = {load_sae(FIX / c).architecture for c in CASES}
    assert archs == {"standard", "jumprelu", "topk", "gated"}


@pytest.mark.parametrize("case", CASES)
def test_encode_decode_match_sae_lens(case):
    sae, exp = load_sae(FIX / case), load_file(str(FIX / case / "expected.safetensors"))
    f, state = sae.encode_with_state(exp["x"])
    assert (f - exp["encode"]).abs().max().item() < 1e-5
    assert (f > 0).sum().item() > 0        # not a trivially all-zero fixture
    assert (sae.decode(f, state) - exp["recon"]).abs().max().item() < 1e-5
    if "decode_rand" in exp:
        assert (sae.decode(exp["f_rand"]) - exp["decode_rand"]).abs().max().item() < 1e-5


def test_pre6_config_is_migrated():
    sae = load_sae(FIX / "pre6_topk")
    assert (sae.architecture, sae.cfg["k"], sae.normalize_activations) == ("topk", 5, "none")
    assert sae.hook_name == "blocks.2.hook_resid_pre" and sae.hook_layer == 1


def test_hook_layer_parsed_from_v6_metadata():
    sae = load_sae(FIX / "standard")
    assert (sae.hook_layer, sae.d_in, sae.d_sae, tuple(sae.W_dec.shape)) == (1, 16, 32, (32, 16))


@pytest.mark.parametrize("name,layer", [("blocks.5.hook_resid_post", 5), ("blocks.5.hook_resid_pre", 4),
                                        ("model.layers.3", 3), ("blocks.0.hook_mlp_out", None)])
def test_layer_from_hook_name(name, layer):
    assert layer_from_hook_name(name) == layer


def test_resid_pre_0_is_rejected():
    with pytest.raises(ValueError, match="embedding"):
        layer_from_hook_name("blocks.0.hook_resid_pre")


def test_d_in_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"d_in=16.*hidden size is 64"):
        load_sae(FIX / "standard").check_d_in(64)


def test_normalising_sae_decode_needs_state():
    with pytest.raises(ValueError, match="encode_with_state"):
        load_sae(FIX / "standard_ln").decode(torch.zeros(32))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae(tmp_path)


def test_unknown_architecture_is_rejected(tmp_path):
    import shutil
    shutil.copytree(FIX / "standard", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["architecture"] = "matryoshka"
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="matryoshka"):
        load_sae(tmp_path / "s")


def test_dtype_override():
    assert load_sae(FIX / "gated", dtype=torch.float64).W_dec.dtype == torch.float64
