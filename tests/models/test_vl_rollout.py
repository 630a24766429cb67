"""The native engine on image prompts: greedy generation equals transformers' `generate`
(prefill with pixel values and 3-D M-RoPE positions, decode positions continuing from
max(position) + 1), at PP=1 and PP=2."""
import pytest
import torch

from tests.helpers import run_multiproc
from tests.models.vl_fixtures import engine_greedy, hf_greedy, processed_batch, tiny_qwen2_5_vl

NEW = 6


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl_rollout") / "hf")


def test_engine_greedy_on_image_prompts_equals_transformers_generate(vl_dir):
    enc = processed_batch(vl_dir)
    ref, ref_logp = hf_greedy(vl_dir, enc, NEW)
    got, logp = engine_greedy(vl_dir, enc, NEW)
    assert got.shape == ref.shape == (2, NEW)
    assert torch.equal(got, ref), (got, ref)
    # the decode steps' log-probs too: wrong M-RoPE decode positions would move them
    assert (logp - ref_logp).abs().max() < 1e-4


def test_images_change_the_rollout(vl_dir):
    """Guard that the equality above depends on the images reaching the prefill: the first
    token's log-prob moves when the pixels do (the tiny random model's argmax may not)."""
    enc = processed_batch(vl_dir)
    _, a = engine_greedy(vl_dir, enc, NEW)
    _, b = engine_greedy(vl_dir, {**enc, "pixel_values": -enc["pixel_values"]}, NEW)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


def _pp2(rank, world, hf_dir, enc, ref):
    from megatron_rl.parallel import destroy_distributed

    got, _ = engine_greedy(hf_dir, enc, NEW, pp=2)
    assert torch.equal(got, ref), (got, ref)
    destroy_distributed()


@pytest.mark.slow   # the PP=1 greedy test stays in CI
@pytest.mark.multiproc
def test_engine_greedy_on_image_prompts_pp2(vl_dir):
    enc = processed_batch(vl_dir)
    run_multiproc(_pp2, 2, (vl_dir, enc, hf_greedy(vl_dir, enc, NEW)[0]))


def test_engine_weight_sync_covers_the_vision_tower(tmp_path, vl_dir):
    """update_weights with the trainer's HF stream (iter_hf_weights) sets every parameter,
    the tower's included (what a trained tower needs after each step)."""
    import transformers

    from megatron_rl.models.loading import iter_hf_weights, load_model_chunks
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine

    init_distributed()
    trained = load_model_chunks(vl_dir)[0]
    other = load_model_chunks(tiny_qwen2_5_vl(tmp_path / "other", seed=1))[0]
    assert not torch.equal(trained.visual.patch_embed.proj.weight, other.visual.patch_embed.proj.weight)
    NativeEngine(other, transformers.AutoTokenizer.from_pretrained(vl_dir)).update_weights(iter_hf_weights(trained))
    for (n, p), (_, q) in zip(trained.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n
