"""Qwen2.5-VL / Qwen2-VL: the config is read (unsupported fields refused by name); logits on
image + text prompts equal transformers' (float32, CPU) at TP=1 and TP=2; the vision tower
trains only with model.freeze_vision=false."""
import json

import pytest
import torch

from tests.helpers import run_multiproc
from tests.models.vl_fixtures import processed_batch, tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl") / "hf")


def test_vl_arch_reads_mrope_and_language_shape(vl_dir):
    from megatron_rl.models.hf_config import arch_from_hf_config
    arch = arch_from_hf_config(vl_dir)
    assert (arch.family, arch.mrope_section, arch.qkv_bias, arch.head_dim, arch.num_layers, arch.is_vl) == \
        ("qwen2_5_vl", [2, 3, 3], True, 16, 2, True)


def test_vl_hub_flat_config_reads_the_same(vl_dir):
    """Hub checkpoints keep the text fields at the top with rope_scaling {type: mrope}."""
    from megatron_rl.models.hf_config import arch_from_hf_config
    cfg = json.loads((__import__("pathlib").Path(vl_dir) / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**cfg, **text, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    a, b = arch_from_hf_config(vl_dir), arch_from_hf_config(flat)
    assert (a.hidden_size, a.num_kv_heads, a.rope_theta, a.mrope_section) == \
        (b.hidden_size, b.num_kv_heads, b.rope_theta, b.mrope_section)


@pytest.mark.parametrize("field,value,match", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "mrope_section": [2, 3, 3]}, "rope_parameters"),
    ("rope_parameters", {"rope_type": "default", "mrope_section": [2, 3, 2]}, "mrope_section"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_vl_unsupported_text_fields_are_refused_by_name(vl_dir, field, value, match):
    from megatron_rl.models.hf_config import arch_from_hf_config
    cfg = json.loads((__import__("pathlib").Path(vl_dir) / "config.json").read_text())
    cfg["text_config"][field] = value
    with pytest.raises(ValueError, match=match):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize("family,spec", [("qwen2_5_vl", "local"), ("qwen2_5_vl", "sdpa"), ("qwen2_vl", "local")])
def test_vl_logits_match_transformers_on_image_prompts(tmp_path, family, spec):
    from megatron_rl.models.vl.parity import compare_vl_logits
    hf = tiny_qwen2_5_vl(tmp_path / "hf", family=family)
    enc = processed_batch(hf)
    res = compare_vl_logits(hf, enc, layer_spec=spec)
    assert res["image_tokens"] == 31 and res["max_abs_diff"] < 1e-4, res


def test_vl_image_features_change_the_logits(vl_dir):
    """The comparison above is only meaningful if the images reach the language model."""
    from megatron_rl.data.multimodal import ImageBatch
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.vl.forward import vl_forward
    from megatron_rl.parallel import init_distributed

    init_distributed()
    enc = processed_batch(vl_dir)
    model = load_checkpoint(vl_dir).eval()
    with torch.no_grad():
        a = vl_forward(model, enc["input_ids"], enc["attention_mask"],
                       ImageBatch(enc["pixel_values"], enc["image_grid_thw"]))
        b = vl_forward(model, enc["input_ids"], enc["attention_mask"],
                       ImageBatch(enc["pixel_values"] * 0.5, enc["image_grid_thw"]))
    last = enc["attention_mask"].shape[1] - 1
    assert (a[:, last] - b[:, last]).abs().max() > 1e-3


def test_check_logits_command_passes_on_the_tiny_vl(vl_dir, capsys):
    from megatron_rl.cli import main
    assert main(["check-logits", "--model", vl_dir]) == 0
    assert "image tokens" in capsys.readouterr().out


@pytest.mark.multiproc
def test_check_logits_command_at_tp2(vl_dir, capsys):
    """`megatron-rl check-logits --tp 2`: two gloo processes, logits gathered over TP."""
    from megatron_rl.models.parity import check_tp
    res, what = check_tp(vl_dir, 2)
    assert res["max_abs_diff"] < 1e-4 and "image tokens" in what, res


def test_freeze_vision_default_and_trainable(vl_dir):
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.parallel import init_distributed

    init_distributed()
    frozen = load_model_chunks(vl_dir)[0]
    assert not any(p.requires_grad for p in frozen.visual.parameters())
    assert all(p.requires_grad for p in frozen.decoder.parameters())
    trained = load_model_chunks(vl_dir, freeze_vision=False)[0]
    assert all(p.requires_grad for p in trained.visual.parameters())


def test_freeze_vision_false_on_a_text_model_is_refused(tmp_path):
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.parallel import init_distributed
    from tests.helpers import make_tiny_hf

    init_distributed()
    with pytest.raises(ValueError, match="model.freeze_vision"):
        load_model_chunks(make_tiny_hf(tmp_path / "hf"), freeze_vision=False)


def _tp2_vs_hf(rank, world, hf_dir, enc, sequence_parallel):
    import transformers

    from megatron_rl.data.multimodal import ImageBatch
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.vl.forward import vl_forward
    from megatron_rl.models.vl.parity import hf_vl_logits
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.collectives import gather_vocab_parallel

    init_distributed(tp=2)
    model = load_checkpoint(hf_dir, sequence_parallel=sequence_parallel).eval()
    assert model.visual is not None
    with torch.no_grad():
        got = gather_vocab_parallel(vl_forward(model, enc["input_ids"], enc["attention_mask"],
                                               ImageBatch(enc["pixel_values"], enc["image_grid_thw"])))[..., :96]
        ref = hf_vl_logits(transformers.AutoModelForImageTextToText.from_pretrained(hf_dir).eval(), enc)
    keep = enc["attention_mask"].bool()
    assert (got[keep] - ref[keep]).abs().max().item() < 1e-4
    destroy_distributed()


@pytest.mark.multiproc
def test_vl_tp2_logits_match_transformers(vl_dir):
    # (sequence parallelism needs a fused norm: not on CPU, so only TP here)
    run_multiproc(_tp2_vs_hf, 2, (vl_dir, processed_batch(vl_dir), False))
