#!/usr/bin/env python
"""Extra time and memory of the VGR pass over the vision span vs the plain log-prob pass,
on a Qwen2.5-VL-3B-shaped random model (issue 25).

The model is the hub Qwen2.5-VL-3B-Instruct config with random weights (language model:
hidden 2048, 36 layers, 16 heads, 2 KV heads, FFN 11008, vocab 151936, tied embeddings;
vision tower: transformers' module, depth 32, hidden 1280, out_hidden 2048), bf16 and the
"sdpa" spec on GPU (no vLLM, no Transformer Engine). Each of `--batch` prompts is
`<|vision_start|>` + one image's pads + `<|vision_end|>` + text, the image a random
`--image-size`^2 pixel tensor (448: a 32x32 patch grid, 256 image tokens after the 2x2
merger), and a random `--response`-token response. Measured, median of `--reps`:
  logprob   `Policy.compute_logprobs` (tower + language model: the pass the trainer runs)
  vgr       the token-weights phase's recomputation (`compute_vgr_weights`): forward
            without logits + response rows over the image-pad and instruction columns of
            the last k layers + VGR weights
  fused     the log-prob pass with the row hooks on (the cost if rows rode along it)
Memory is the peak allocated above the resident weights (GPU only). Prints one markdown
table and, when $OUT is set, writes $OUT/vl_vgr_results.md.

    python tools/bench_vl_vgr.py                    # GPU (< 3 minutes on one H200)
    python tools/bench_vl_vgr.py --tiny             # CPU smoke test (tiny shapes, seconds)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_vgr import build_policy, measure  # noqa: E402

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
QWEN2_5_VL_3B = {      # the hub's Qwen/Qwen2.5-VL-3B-Instruct config.json (the fields the model reads)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END, "vision_token_id": 151654, "image_token_id": IMAGE_PAD,
    "video_token_id": VIDEO_PAD, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11008,
    "max_position_embeddings": 128000, "max_window_layers": 70, "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
TINY = {**QWEN2_5_VL_3B, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 4, "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {**QWEN2_5_VL_3B["vision_config"], "depth": 2, "hidden_size": 32, "intermediate_size": 48,
                          "num_heads": 2, "out_hidden_size": 64, "patch_size": 4, "spatial_patch_size": 4,
                          "window_size": 16, "fullatt_block_indexes": [1]}}


def make_vl_batch(n: int, image_size: int, text: int, response: int, vc: dict, vocab_text: int = 151643):
    """`n` one-image prompts (`text` instruction tokens after the image span) with random
    pixel values and responses; returns (batch, context mask, instruction mask)."""
    from megatron_rl.data.batch import Batch
    from megatron_rl.data.multimodal import ImageInputs

    patch, merge, temporal = vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]
    if image_size % (patch * merge):
        raise SystemExit(f"--image-size {image_size} must be a multiple of patch*merge = {patch * merge}")
    side = image_size // patch
    pads = side * side // merge ** 2
    g = torch.Generator().manual_seed(0)
    head = torch.randint(0, vocab_text, (n, 4), generator=g)
    tail = torch.randint(0, vocab_text, (n, text), generator=g)
    span = torch.cat([torch.full((n, 1), VISION_START), torch.full((n, pads), IMAGE_PAD),
                      torch.full((n, 1), VISION_END)], 1)
    prompt = torch.cat([head, span, tail], 1)
    samples = [{"uid": str(i), "images": ImageInputs(
        torch.randn(side * side, 3 * temporal * patch * patch, generator=g), torch.tensor([[1, side, side]]))}
        for i in range(n)]
    batch = Batch({"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
                   "response_ids": torch.randint(0, vocab_text, (n, response), generator=g),
                   "response_mask": torch.ones(n, response)}, samples)
    ctx = (prompt == IMAGE_PAD).float()
    ins = ((prompt != IMAGE_PAD) & (prompt != VISION_START) & (prompt != VISION_END)).float()
    return batch, ctx, ins


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=8, help="image+text prompts per measured call")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=448, help="square image side in pixels")
    ap.add_argument("--text", type=int, default=64, help="instruction tokens after the image span")
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=None,
                    help="language-model layers (default: the 3B's 36); fewer if memory/time needs it")
    ap.add_argument("--last-k", type=int, nargs="+", default=[4, 36])
    ap.add_argument("--row-chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer-spec", default=None, help="default: sdpa on GPU, local on CPU")
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.micro_batch, args.image_size, args.text, args.response = 2, 1, 16, 8, 8
        args.last_k, args.row_chunk, args.reps = [2], 4, 1
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.token_weights.attention_rows import capture_rows, selected_layer_numbers
    from megatron_rl.token_weights.phase import compute_vgr_weights

    gpu = torch.cuda.is_available()
    hf = dict(TINY if args.tiny else QWEN2_5_VL_3B)
    if args.num_layers:
        hf["num_hidden_layers"] = args.num_layers
    arch = arch_from_hf_config(hf)
    model, policy = build_policy(arch, args, gpu)
    dtype, spec = ("bfloat16" if gpu else "float32"), args.layer_spec or ("sdpa" if gpu else "local")
    batch, ctx, ins = make_vl_batch(args.batch, args.image_size, args.text, args.response, hf["vision_config"])
    prompt_len = batch["prompt_ids"].shape[1]
    resident = torch.cuda.memory_allocated() / 2**30 if gpu else 0.0

    rows = []
    t_lp, m_lp = measure(lambda: policy.compute_logprobs(batch), args.reps, gpu)
    rows.append(("logprob (baseline)", "-", t_lp, m_lp))
    for k in [min(k, arch.num_layers) for k in args.last_k]:
        layers = selected_layer_numbers(arch.num_layers, k)
        cfg = SimpleNamespace(micro_batch_size=args.micro_batch, row_chunk=args.row_chunk, smooth_sigma=0.0)
        t, m = measure(lambda: compute_vgr_weights(policy, batch, ctx, ins, layers, cfg), args.reps, gpu)
        rows.append(("vgr recompute", k, t, m))

        def fused():
            with capture_rows(model, layers, prompt_len, args.row_chunk):
                policy.compute_logprobs(batch)
        t, m = measure(fused, args.reps, gpu)
        rows.append(("logprob + row hooks", k, t, m))

    dev = torch.cuda.get_device_name() if gpu else "CPU"
    pads = int(ctx[0].sum())
    head = (f"VGR over the vision span, {'tiny' if args.tiny else 'Qwen2.5-VL-3B-shaped'} random model "
            f"({arch.num_layers} layers, tower depth {hf['vision_config']['depth']}), {dtype}, {spec} spec, {dev}; "
            f"{args.batch} prompts x ({prompt_len} prompt tokens: one {args.image_size}x{args.image_size} image = "
            f"{pads} image tokens, + {args.response} response tokens), micro-batch {args.micro_batch}, row chunk "
            f"{args.row_chunk}; resident weights {resident:.1f} GiB")
    lines = [head, "", "| pass | last k | time (s) | vs logprob | peak extra mem (MiB) | vs logprob |",
             "|---|---|---|---|---|---|"]
    for name, k, t, m in rows:
        rel = f"{m / m_lp:.2f}x" if m_lp > 0 else "-"
        lines.append(f"| {name} | {k} | {t:.3f} | {t / t_lp:.2f}x | {m:.0f} | {rel} |")
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vl_vgr_results.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
