"""HF -> Megatron (TP=2) -> HF reproduces every tensor bit for bit; the Megatron
checkpoint loads at another layout; bad inputs give clear errors."""
import pytest
import torch
from safetensors.torch import load_file

from checkpoints_conversion.convert import hf_to_mcore, mcore_to_hf
from tests.helpers import make_tiny_hf, run_multiproc


@pytest.mark.multiproc
@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False)])
def test_round_trip_tp2_is_bit_exact(tmp_path, family, tie):
    hf = make_tiny_hf(tmp_path / "hf", family, tie=tie)
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    mcore_to_hf(tmp_path / "mc", tmp_path / "hf2")
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (tmp_path / "hf2" / "config.json").exists()


def _pp2_logits(rank, world, ckpt, ids, out):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.models.schedule import run_microbatches
    from megatron_rl.parallel import init_distributed, is_pp_last

    init_distributed(tp=1, pp=2)
    model = load_checkpoint(ckpt, layer_spec="local")
    with torch.no_grad():
        res = run_microbatches(model, [{"input_ids": ids}], lambda m, mb: gpt_forward(m, mb["input_ids"]),
                               lambda mb, o: (o.sum() * 0, {"logits": o}), forward_only=True)
    if is_pp_last():
        torch.save(res[0]["logits"], out)


@pytest.mark.multiproc
def test_tp2_checkpoint_loads_at_pp2_with_same_logits(tmp_path):
    from megatron_rl.models.parity import compare_logits  # noqa: F401  (import check)

    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=True)
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    run_multiproc(_pp2_logits, 2, (str(tmp_path / "mc"), ids, str(tmp_path / "pp2.pt")))
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()(input_ids=ids).logits
    got = torch.load(tmp_path / "pp2.pt")
    assert (ref - got).abs().max().item() < 1e-4


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="config"):
        hf_to_mcore(tmp_path, tmp_path / "out")


def test_unsupported_architecture_names_the_field(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="architectures"):
        hf_to_mcore(tmp_path, tmp_path / "out")


def test_mcore_to_hf_rejects_an_hf_dir(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    with pytest.raises(ValueError, match="not a megatron-rl Megatron checkpoint"):
        mcore_to_hf(hf, tmp_path / "out")


def test_shape_mismatch_names_the_tensor(tmp_path):
    from megatron_rl.models import build_model, load_hf_weights
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.parallel import init_distributed

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    init_distributed()
    arch = arch_from_hf_config(hf)
    arch.ffn_hidden_size = 96     # the checkpoint has 128
    model = build_model(arch, layer_spec="local")
    with pytest.raises(ValueError, match="mlp.gate_proj.weight"):
        load_hf_weights(model, hf, arch)
