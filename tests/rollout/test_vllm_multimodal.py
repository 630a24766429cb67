"""vLLM image prompts with fake vLLM objects: the request format (one <|image_pad|> per
image, the raw images as multi_modal_data), vLLM's expanded prompt checked against ours,
the images kept on the output rows, the engine arguments of a VL checkpoint, and the
weight-sync names (the tower's only when it trains; every name one vLLM's mapper takes)."""
import json
import sys
import types

import pytest
import torch
from PIL import Image

from megatron_rl.data.batch import Batch
from megatron_rl.data.multimodal import ImageInputs, VisionTokens
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.vllm_config import VLLMConfig
from megatron_rl.rollout.vllm_multimodal import collapse_image_pads, vision_skip_prefixes, vl_engine_kwargs
from tests.models.vl_fixtures import write_vl_tokenizer

# vLLM 0.26 Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix (first match wins)
VLLM_PREFIXES = {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                 "lm_head.": "language_model.lm_head.", "model.": "language_model.model."}


def vllm_name(name: str) -> str:
    for src, dst in VLLM_PREFIXES.items():
        if name.startswith(src):
            return dst + name[len(src):]
    return name


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_vl_tokenizer(tmp_path_factory.mktemp("tok"))


def _batch(tok):
    """Row 0: two images (4 and 2 pads, expanded as the dataset does), row 1: text only."""
    t = VisionTokens.of(tok)
    a, b = 5, 6
    row0 = [a, t.start] + [t.pad] * 4 + [t.end, t.start] + [t.pad] * 2 + [t.end, b]
    row1 = [a, b, a]
    width = len(row0)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(row0), 1
    ids[1, -3:], mask[1, -3:] = torch.tensor(row1), 1
    raw = (Image.new("RGB", (16, 16), "red"), Image.new("RGB", (8, 16), "blue"))
    img = ImageInputs(torch.zeros(24, 12), torch.tensor([[1, 4, 4], [1, 4, 2]]), raw)
    return Batch({"prompt_ids": ids, "prompt_mask": mask}, [{"uid": "img", "images": img}, {"uid": "txt"}]), row0


class FakeLLM:
    """Records requests; expands each pad as vLLM's Qwen2-VL prompt update does (grid / merge^2)."""

    def __init__(self, pad, merge=2, counts=None):
        self.pad, self.merge, self.counts, self.requests = pad, merge, counts, []

    def generate(self, requests, params, use_tqdm=False):
        self.requests += requests
        outs = []
        for req, sp in zip(requests, params):
            counts = iter(self.counts or [w * h // self.merge ** 2 for w, h in
                                          (im.size for im in req.get("multi_modal_data", {}).get("image", []))])
            expanded = []
            for t in req["prompt_token_ids"]:
                expanded += [t] * next(counts) if t == self.pad else [t]
            comps = [types.SimpleNamespace(index=j, token_ids=[7, 8], finish_reason="stop",
                                           logprobs=[{7: -1.0}, {8: -2.0}]) for j in range(sp.kw["n"])]
            outs.append(types.SimpleNamespace(prompt_token_ids=expanded, outputs=comps))
        return outs


def _engine(tok, llm):
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(llm, tok, VLLMConfig(sleep_level=0), colocate=True)


def test_vllm_image_request_has_one_pad_per_image_and_the_raw_images(fake_vllm, tok):
    t = VisionTokens.of(tok)
    batch, row0 = _batch(tok)
    # raw images sized so that the fake's grid (w*h/4 in pixels here) gives 4 and 2 pads, as the dataset did
    batch.samples[0]["images"].raw = (Image.new("RGB", (4, 4)), Image.new("RGB", (4, 2)))
    llm = FakeLLM(t.pad)
    out = _engine(tok, llm).generate(batch, SamplingParams(n=2, max_new_tokens=2))
    img_req, txt_req = llm.requests
    assert img_req["prompt_token_ids"] == [5, t.start, t.pad, t.end, t.start, t.pad, t.end, 6]
    assert img_req["multi_modal_data"]["image"] == list(batch.samples[0]["images"].raw)
    assert txt_req == {"prompt_token_ids": [5, 6, 5]}                       # text rows unchanged
    assert [s["uid"] for s in out.samples] == ["img", "img", "txt", "txt"]
    assert out.samples[0]["images"] is batch.samples[0]["images"] is out.samples[1]["images"]
    assert "images" not in out.samples[2]
    assert torch.equal(out["prompt_ids"][0], torch.tensor(row0))          # the trainer sees the expanded prompt
    assert out["response_ids"].tolist() == [[7, 8]] * 4


def test_vllm_other_image_grid_is_an_error_naming_the_pixel_bounds(fake_vllm, tok):
    batch, _ = _batch(tok)
    llm = FakeLLM(VisionTokens.of(tok).pad, counts=[4, 3])                 # vLLM resized image 1 differently
    with pytest.raises(RuntimeError, match=r"data.image.min_pixels / data.image.max_pixels"):
        _engine(tok, llm).generate(batch, SamplingParams(n=1, max_new_tokens=2))


def test_vllm_images_without_raw_ones_are_an_error(fake_vllm, tok):
    batch, _ = _batch(tok)
    batch.samples[0]["images"] = ImageInputs(torch.zeros(24, 12), torch.tensor([[1, 4, 4], [1, 4, 2]]))
    with pytest.raises(ValueError, match=r"2 processed images but 0 raw ones \(ImageInputs.raw\)"):
        _engine(tok, FakeLLM(VisionTokens.of(tok).pad)).generate(batch, SamplingParams(n=1, max_new_tokens=2))


def test_collapse_counts_runs_per_image():
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 3], 9, 2, "x") == [1, 9, 2, 9, 3]
    with pytest.raises(ValueError, match="x: the prompt has 1 runs of <\\|image_pad\\|> tokens for 2 images"):
        collapse_image_pads([1, 9, 9, 2], 9, 2, "x")


def test_image_inputs_keep_raw_images_through_to():
    raw = (Image.new("RGB", (4, 4)),)
    assert ImageInputs(torch.zeros(1, 2), torch.tensor([[1, 1, 1]]), raw).to("cpu").raw is raw


def _cfg(path, freeze=True, min_pixels=None, max_pixels=None, processor_path=None):
    image = types.SimpleNamespace(max_images=3, min_pixels=min_pixels, max_pixels=max_pixels,
                                  processor_path=processor_path)
    return types.SimpleNamespace(model=types.SimpleNamespace(path=str(path), freeze_vision=freeze),
                                 data=types.SimpleNamespace(image=image))


def test_vl_engine_kwargs_and_skipped_names(tmp_path):
    from tests.models.vl_fixtures import tiny_qwen2_5_vl

    vl = tiny_qwen2_5_vl(tmp_path / "vl")
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert vl_engine_kwargs(_cfg(text), str(text)) == {} and vision_skip_prefixes(_cfg(text, False)) == ()
    assert vl_engine_kwargs(_cfg(vl), vl) == {"limit_mm_per_prompt": {"image": 3, "video": 0}}
    kw = vl_engine_kwargs(_cfg(vl, max_pixels=32 * 32), vl)
    assert kw["mm_processor_kwargs"] == {"size": {"shortest_edge": 8 * 8, "longest_edge": 32 * 32}}
    assert vision_skip_prefixes(_cfg(vl)) == ("visual.",) and vision_skip_prefixes(_cfg(vl, False)) == ()


@pytest.mark.parametrize("freeze", [True, False])
def test_vllm_sync_streams_the_tower_only_when_it_trains(fake_vllm, tmp_path, tok, freeze):
    """The names streamed from the tiny Qwen2.5-VL, mapped as vLLM 0.26 maps them, are the
    checkpoint's (what vLLM loaded at start), without the tower's when it is frozen."""
    from safetensors import safe_open

    from megatron_rl.models.loading import iter_hf_weights, load_model_chunks
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from tests.models.vl_fixtures import tiny_qwen2_5_vl

    init_distributed()
    vl = tiny_qwen2_5_vl(tmp_path / "vl")
    with safe_open(f"{vl}/model.safetensors", "pt") as f:
        want = {vllm_name(k) for k in f.keys()}
    loaded = {}
    llm = types.SimpleNamespace(apply_model=lambda fn: [fn(types.SimpleNamespace(
        load_weights=lambda ws: [loaded.__setitem__(vllm_name(n), t) for n, t in ws]))])
    eng = VLLMEngine(llm, tok, VLLMConfig(sleep_level=0), colocate=True,
                     skip_prefixes=vision_skip_prefixes(_cfg(vl, freeze)))
    eng.update_weights(iter_hf_weights(load_model_chunks(vl, freeze_vision=freeze)))
    towers = {n for n in want if n.startswith("visual.")}
    assert towers and all(n.startswith(("visual.", "language_model.model.", "language_model.lm_head.")) for n in want)
    assert set(loaded) == (want - towers if freeze else want)
