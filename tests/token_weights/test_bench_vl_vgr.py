"""tools/bench_vl_vgr.py on CPU: its arguments, the image-span batch it builds, and a
tiny-shape dry run of the table (the numbers themselves come from the GPU)."""
import pytest
import torch

from tools.bench_vl_vgr import IMAGE_PAD, QWEN2_5_VL_3B, VISION_END, VISION_START, main, make_vl_batch, parse_args


def test_bench_vl_vgr_defaults_are_the_3b_run():
    a = parse_args([])
    assert (a.batch, a.image_size, a.response, a.last_k, a.layer_spec) == (8, 448, 256, [4, 36], None)
    assert parse_args(["--tiny"]).image_size == 16
    from megatron_rl.models.hf_config import arch_from_hf_config
    arch = arch_from_hf_config(QWEN2_5_VL_3B)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.ffn_hidden_size,
            arch.vocab_size) == (36, 2048, 16, 2, 11008, 151936)


def test_bench_vl_vgr_batch_marks_the_image_pads_as_context():
    batch, ctx, ins = make_vl_batch(2, 448, text=5, response=3, vc=QWEN2_5_VL_3B["vision_config"])
    ids = batch["prompt_ids"]
    assert ids.shape == (2, 4 + 1 + 256 + 1 + 5)                  # 448 px: 32x32 patches, 256 tokens after 2x2 merge
    assert torch.equal(ctx.bool(), ids == IMAGE_PAD) and int(ctx[0].sum()) == 256
    assert not bool((ins.bool() & ((ids == VISION_START) | (ids == VISION_END) | ctx.bool())).any())
    img = batch.samples[0]["images"]
    assert img.image_grid_thw.tolist() == [[1, 32, 32]] and img.pixel_values.shape == (1024, 3 * 2 * 14 * 14)
    with pytest.raises(SystemExit, match="multiple of patch"):
        make_vl_batch(1, 450, 1, 1, QWEN2_5_VL_3B["vision_config"])


def test_bench_vl_vgr_tiny_dry_run_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    text = main(["--tiny"])
    assert (tmp_path / "vl_vgr_results.md").read_text().strip() == text
    assert "| logprob (baseline) | - |" in text and "| vgr recompute | 2 |" in text
    assert "| logprob + row hooks | 2 |" in text and "4 image tokens" in text
