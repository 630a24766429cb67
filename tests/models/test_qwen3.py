"""Qwen3 (QK-norm, head_dim != hidden/heads, no qkv bias): logits equal transformers'
for every CPU layer spec, at TP=1 and TP=2; HF -> Megatron -> HF is bit-exact."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.models.parity import compare_logits
from tests.helpers import make_tiny_hf, run_multiproc


def test_qwen3_arch_reads_qk_norm_and_head_dim(tmp_path):
    from megatron_rl.models.hf_config import arch_from_hf_config
    arch = arch_from_hf_config(make_tiny_hf(tmp_path / "hf", "qwen3", tie=False))
    assert (arch.family, arch.qk_layernorm, arch.head_dim, arch.qkv_bias) == ("qwen3", True, 24, False)


def test_qwen3_attention_bias_is_refused_by_name(tmp_path):
    import json
    from megatron_rl.models.hf_config import arch_from_hf_config
    make_tiny_hf(tmp_path / "hf", "qwen3")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["attention_bias"] = True
    with pytest.raises(ValueError, match="attention_bias"):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize("spec", ["local", "sdpa"])
@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_logits_match_transformers(tmp_path, spec, tie):
    hf = make_tiny_hf(tmp_path / "hf", "qwen3", tie=tie)
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :5] = 0      # left padding
    assert compare_logits(hf, ids, am, layer_spec=spec)["max_abs_diff"] < 1e-4


def _tp2_vs_hf(rank, world, hf_dir, spec, ids, am):
    import transformers
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward, position_ids_from_mask
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.collectives import gather_vocab_parallel

    init_distributed(tp=2)
    model = load_checkpoint(hf_dir, layer_spec=spec).eval()
    with torch.no_grad():
        got = gather_vocab_parallel(gpt_forward(model, ids, am))[..., :96]
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(
            input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
    keep = am.bool()
    assert (got[keep] - ref[keep]).abs().max().item() < 1e-4
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("spec", ["local", "sdpa"])
def test_qwen3_tp2_logits_match_transformers(tmp_path, spec):
    hf = make_tiny_hf(tmp_path / "hf", "qwen3", tie=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    run_multiproc(_tp2_vs_hf, 2, (hf, spec, ids, am))


@pytest.mark.multiproc
def test_qwen3_round_trip_tp2_is_bit_exact(tmp_path):
    from checkpoints_conversion.convert import hf_to_mcore, mcore_to_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen3", tie=False)
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    mcore_to_hf(tmp_path / "mc", tmp_path / "hf2")
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b) and any("q_norm" in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
