"""`megatron-rl convert hf-to-mcore --ep 2` on MoE checkpoints: two processes each write
their half of the experts; the checkpoint converts back to HF bit for bit (and loads at
EP=1); --ep on a dense model or not dividing the experts is an error naming the flag."""
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_tiny_hf


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_cli_hf_to_mcore_ep2_round_trip_is_bit_exact(tmp_path, family):
    import json

    from megatron_rl.cli import main

    hf = make_tiny_hf(tmp_path / "hf", family, tie=False)
    mc, back = tmp_path / "mc", tmp_path / "hf2"
    assert main(["convert", "hf-to-mcore", "--hf-dir", hf, "--out", str(mc), "--ep", "2"]) == 0
    assert json.loads((mc / "megatron_rl.json").read_text())["saved_ep"] == 2
    assert main(["convert", "mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back)]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and any(".experts." in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family,ep,match", [("llama", 2, r"--ep 2: .* dense model"),
                                             ("qwen3_moe", 3, r"--ep 3 does not divide num_experts=4")])
def test_bad_ep_names_the_flag(tmp_path, family, ep, match):
    from checkpoints_conversion.convert import hf_to_mcore

    hf = make_tiny_hf(tmp_path / "hf", family)
    with pytest.raises(ValueError, match=match):
        hf_to_mcore(hf, tmp_path / "out", ep=ep)
