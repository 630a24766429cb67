"""`megatron-rl check-logits` for Qwen2-VL / Qwen2.5-VL: Megatron vs transformers logits on
image + text prompts (random images through the checkpoint's own image processor)."""
from __future__ import annotations

import time

import torch


def encode_image_prompts(model_dir, questions: list[str], images: list) -> dict:
    """input_ids / attention_mask (left padded), pixel_values, image_grid_thw for one image per
    question, as the Qwen2-VL processor makes them: the chat template puts
    `<|vision_start|><|image_pad|><|vision_end|>` and each pad becomes t*h*w / merge^2 pads.
    (transformers' AutoProcessor for Qwen2-VL also builds a video processor, which needs
    torchvision; the image processor and tokenizer alone suffice here.)"""
    import transformers

    ip = transformers.AutoImageProcessor.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    vis = ip(images=images, return_tensors="pt")
    counts = iter((vis["image_grid_thw"].prod(-1) // ip.merge_size ** 2).tolist())
    texts = []
    for q in questions:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        head, *rest = text.split("<|image_pad|>")
        texts.append(head + "".join("<|image_pad|>" * int(next(counts)) + r for r in rest))
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}


def hf_vl_logits(hf_model, enc: dict) -> torch.Tensor:
    """transformers' logits for `enc` (mm_token_type_ids from the image-pad id, as the processor does)."""
    ids = enc["input_ids"]
    mm = (ids == hf_model.config.image_token_id).int()
    return hf_model(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=mm).logits


def compare_vl_logits(hf_dir, enc: dict, dtype=torch.float32, layer_spec: str = "local") -> dict:
    """Comparison at the initialised TP layout (default one process, TP=1) over real tokens."""
    import transformers

    from megatron_rl.data.multimodal import ImageBatch
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.vl.forward import vl_forward
    from megatron_rl.parallel import init_distributed
    from megatron_rl.parallel.collectives import gather_vocab_parallel

    from megatron.core import parallel_state as mpu
    if not mpu.model_parallel_is_initialized():     # else: the caller's layout (check-logits --tp)
        init_distributed()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mdt = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    mc = load_checkpoint(hf_dir, dtype=mdt, layer_spec=layer_spec).eval()
    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
    enc = {k: v.to(dev) for k, v in enc.items()}
    images = ImageBatch(enc["pixel_values"], enc["image_grid_thw"])
    with torch.no_grad():
        t0 = time.time()
        a = gather_vocab_parallel(vl_forward(mc, enc["input_ids"], enc["attention_mask"], images))
        a = a.float()[..., : hf.config.text_config.vocab_size]
        t1 = time.time()
        b = hf_vl_logits(hf, enc).float()
        t2 = time.time()
    keep = enc["attention_mask"].bool()
    diff = (a[keep] - b[keep]).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "logit_scale": b[keep].abs().max().item(), "megatron_s": t1 - t0, "hf_s": t2 - t1,
            "tokens": int(keep.sum()), "image_tokens": int((enc["input_ids"] == hf.config.image_token_id).sum())}


def random_images(n: int = 2, seed: int = 0, sizes=((56, 56), (28, 84))) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes[:n]]


def check_vl(hf_dir: str) -> tuple[dict, str]:
    """`check-logits` on a VL checkpoint: two questions about two random images."""
    enc = encode_image_prompts(hf_dir, ["Describe the image.", "How many shapes are there?"], random_images())
    res = compare_vl_logits(hf_dir, enc)
    return res, f"{res['tokens']} tokens ({res['image_tokens']} image tokens)"
