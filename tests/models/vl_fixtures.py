"""A tiny random Qwen2.5-VL (and Qwen2-VL) saved by transformers, with an offline
processor (Qwen2-VL image processor + a word-level tokenizer that knows the vision
special tokens) beside it. Shared by the VL-model and VL-data tests.

Shapes: text 2 layers, hidden 64, 4 heads / 2 KV heads (head_dim 16, mrope_section
[2, 3, 3]); vision 2 blocks (block 1 full attention, block 0 windowed), hidden 32,
patch 4, temporal patch 2, merge 2, window 16 px (2x2 merged tokens per window). A
32x32 image gives an 8x8 patch grid, 16 image-pad tokens, 4 attention windows.
"""
from __future__ import annotations

from pathlib import Path

import torch

VL_WORDS = ("how many red blue green circles squares are there in the image ? a b c 0 1 2 3 4 5 6 7 8 9 "
            "answer is the describe picture shape color count yes no").split()
VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VL_VOCAB = 96
PATCH, MERGE, TEMPORAL = 4, 2, 2


def write_vl_tokenizer(out_dir) -> "transformers.PreTrainedTokenizerFast":  # noqa: F821
    """Word-level tokenizer with ChatML-like template; vision tokens are special (never split)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + VL_SPECIALS + list(VL_WORDS))}
    assert len(vocab) <= VL_VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VL_SPECIALS + ["<|im_end|>"]])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>")
    hf.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} "
        "{% endif %}{% endfor %}{% endif %} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    hf.save_pretrained(out_dir)
    return hf


def _image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # min/max pixels keep the tiny test images at their size (a multiple of patch*merge = 8)
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                 min_pixels=8 * 8, max_pixels=64 * 64)


def tiny_vl_config(tok, family: str = "qwen2_5_vl", tie: bool = False):
    import transformers

    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_SPECIALS}
    text = dict(vocab_size=VL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=tie)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=16,
                      out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2)
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **common)


def tiny_qwen2_5_vl(tmp_path, family: str = "qwen2_5_vl", tie: bool = False, seed: int = 0) -> str:
    """Save a random tiny Qwen2.5-VL (`family="qwen2_vl"`: Qwen2-VL) with its processor; returns the dir."""
    import transformers

    out = Path(tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_vl_tokenizer(out)
    cfg = tiny_vl_config(tok, family, tie)
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
           else transformers.Qwen2VLForConditionalGeneration)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():   # non-trivial norms and biases so the mapping is really tested
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    model.save_pretrained(out, safe_serialization=True)
    # transformers' Qwen2-VL processor also builds a video processor, which needs torchvision
    # (not installed here): save the image processor and tokenizer; `process_vl` combines them.
    _image_processor().save_pretrained(out)
    return str(out)


def tiny_images(seed: int = 0, sizes=((32, 32), (24, 40))) -> list:
    """Random RGB PIL images (height, width multiples of 8)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def image_prompt(question: str = "how many red circles are there in the image ?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def process_vl(model_dir, texts: list[str], images: list) -> dict:
    """What `Qwen2_5_VLProcessor.__call__` returns for one image per text (left padded):
    each `<|image_pad|>` becomes grid_t*grid_h*grid_w / merge**2 pads."""
    import transformers

    ip = transformers.AutoImageProcessor.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    vis = ip(images=images, return_tensors="pt")
    grid = vis["image_grid_thw"]
    it = iter(grid.prod(-1) // ip.merge_size**2)
    expanded = []
    for t in texts:
        parts = t.split("<|image_pad|>")
        expanded.append(parts[0] + "".join("<|image_pad|>" * int(next(it)) + p for p in parts[1:]))
    tok.padding_side = "left"
    enc = tok(expanded, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    mm_types = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).int()     # text 0, image 1 (video 2)
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": mm_types,
            "pixel_values": vis["pixel_values"], "image_grid_thw": grid}


def processed_batch(model_dir, images=None, questions=None) -> dict:
    """Processor output for a left-padded batch of one-image chat prompts."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    images = images if images is not None else tiny_images()
    questions = questions or ["how many red circles are there in the image ?", "describe the picture"][: len(images)]
    texts = [tok.apply_chat_template(image_prompt(q), add_generation_prompt=True, tokenize=False) for q in questions]
    return process_vl(model_dir, texts, images)


def image_batch(enc):
    """A Batch of the processed prompts with each row's ImageInputs in its record."""
    from megatron_rl.data.batch import Batch
    from megatron_rl.data.multimodal import ImageInputs

    sizes = enc["image_grid_thw"].prod(-1).tolist()
    pixels = enc["pixel_values"].split(sizes)
    samples = [{"uid": str(i), "images": ImageInputs(pixels[i], enc["image_grid_thw"][i:i + 1])}
               for i in range(len(sizes))]
    return Batch({"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"]}, samples)


def hf_greedy(hf_dir, enc, new: int = 6):
    """transformers' greedy tokens [b, new] and their log-probs."""
    import transformers

    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    mm = (enc["input_ids"] == hf.config.image_token_id).int()
    out = hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=mm,
                      max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                      output_logits=True)
    tokens = out.sequences[:, enc["input_ids"].shape[1]:]
    logp = torch.stack([lg.float().log_softmax(-1) for lg in out.logits], 1)     # [b, new, vocab]
    return tokens, logp.gather(-1, tokens[..., None])[..., 0]


def engine_greedy(hf_dir, enc, new: int = 6, tp=1, pp=1):
    """The native engine's greedy tokens [b, new] and rollout log-probs (one model chunk)."""
    import transformers

    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams

    init_distributed(tp=tp, pp=pp)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    engine = NativeEngine(load_model_chunks(hf_dir)[0], tok)
    out = engine.generate(image_batch(enc), SamplingParams(greedy=True, max_new_tokens=new, min_new_tokens=new))
    return out["response_ids"], out["rollout_logprob"]
