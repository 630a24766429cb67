#!/usr/bin/env python
"""Extra time and memory of the VGR attention recomputation vs the plain log-prob pass.

A random SmolLM2-135M-shaped Megatron model (30 layers, hidden 576, 9 heads, 3 kv heads;
bf16 and the "sdpa" spec on GPU, float32 and "local" on CPU), prompts of `--prompt`
tokens and responses of `--response` tokens. Measured, median of `--reps`:
  logprob   `Policy.compute_logprobs` (the pass the trainer already runs)
  vgr       the token-weights phase's recomputation: forward without logits + response
            rows of the last k layers (`row_chunk` queries at a time) + VGR weights
  fused     the log-prob pass with the row hooks on (the cost if rows rode along it)
Memory is the peak allocated above the resident weights (GPU only). Prints a table and,
when $OUT is set, writes $OUT/vgr_results.md. Needs only torch + megatron-core.

    python tools/bench_vgr.py                       # GPU: 2k-token responses
    python tools/bench_vgr.py --tiny                # CPU smoke test (seconds)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_135M = dict(family="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                    ffn_hidden_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=False)
TINY = dict(SMOLLM2_135M, num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
            ffn_hidden_size=128, vocab_size=256, max_position_embeddings=512)


def make_batch(n: int, prompt: int, response: int, vocab: int, context_frac: float = 0.75):
    """Random tokens; the first `context_frac` of each prompt is marked as context."""
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    batch = Batch({"prompt_ids": torch.randint(0, vocab, (n, prompt), generator=g),
                   "prompt_mask": torch.ones(n, prompt, dtype=torch.long),
                   "response_ids": torch.randint(0, vocab, (n, response), generator=g),
                   "response_mask": torch.ones(n, response)},
                  [{"uid": str(i)} for i in range(n)])
    ctx = torch.zeros(n, prompt)
    ctx[:, 1: int(prompt * context_frac)] = 1.0
    ins = torch.zeros(n, prompt)
    ins[:, int(prompt * context_frac):] = 1.0
    return batch, ctx, ins


def measure(fn, reps: int, gpu: bool) -> tuple[float, float]:
    """(median seconds, peak allocated MiB above the memory in use before the call)."""
    fn()                                            # warm-up (kernels, allocator)
    times, peak = [], 0.0
    for _ in range(reps):
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        if gpu:
            torch.cuda.synchronize()
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def build_policy(arch, args, gpu: bool):
    """(model, Policy) of the benchmarked model (bf16 + sdpa on GPU, fp32 + local on CPU unless
    `--layer-spec`), in eval mode, seed 0; shared with tools/bench_vl_vgr.py."""
    from megatron_rl.models.provider import build_model
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.policy import Policy

    init_distributed()
    torch.manual_seed(0)
    model = build_model(arch, dtype="bfloat16" if gpu else "float32",
                        layer_spec=args.layer_spec or ("sdpa" if gpu else "local"))
    model.eval()
    return model, Policy(model, micro_batch_size=args.micro_batch)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per measured call")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=2048)
    ap.add_argument("--last-k", type=int, nargs="+", default=[4, 30])
    ap.add_argument("--row-chunk", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer-spec", default=None, help="default: sdpa on GPU, local on CPU")
    args = ap.parse_args(argv)

    from megatron_rl.models.hf_config import ModelArch
    from megatron_rl.token_weights.attention_rows import capture_rows, selected_layer_numbers
    from megatron_rl.token_weights.phase import compute_vgr_weights

    gpu = torch.cuda.is_available()
    if args.tiny:
        args.batch, args.micro_batch, args.prompt, args.response = 2, 1, 16, 32
        args.last_k, args.row_chunk, args.reps = [2], [8, 32], 1
    arch = ModelArch(**(TINY if args.tiny else SMOLLM2_135M))
    model, policy = build_policy(arch, args, gpu)
    dtype, spec = ("bfloat16" if gpu else "float32"), args.layer_spec or ("sdpa" if gpu else "local")
    batch, ctx, ins = make_batch(args.batch, args.prompt, args.response, arch.vocab_size)
    resident = torch.cuda.memory_allocated() / 2**20 if gpu else 0.0

    rows = []
    t_lp, m_lp = measure(lambda: policy.compute_logprobs(batch), args.reps, gpu)
    rows.append(("logprob (baseline)", "-", "-", t_lp, m_lp))
    for k in args.last_k:
        layers = selected_layer_numbers(arch.num_layers, k)
        for chunk in args.row_chunk:
            cfg = SimpleNamespace(micro_batch_size=args.micro_batch, row_chunk=chunk, smooth_sigma=0.0)
            t, m = measure(lambda: compute_vgr_weights(policy, batch, ctx, ins, layers, cfg), args.reps, gpu)
            rows.append(("vgr recompute", k, chunk, t, m))

            def fused():
                with capture_rows(model, layers, args.prompt, chunk):
                    policy.compute_logprobs(batch)
            t, m = measure(fused, args.reps, gpu)
            rows.append(("logprob + row hooks", k, chunk, t, m))

    dev = torch.cuda.get_device_name() if gpu else "CPU"
    head = (f"VGR attention recomputation, {'tiny' if args.tiny else 'SmolLM2-135M-shaped'} random model, "
            f"{dtype}, {spec} spec, {dev}; {args.batch} sequences x ({args.prompt} prompt + {args.response} response) "
            f"tokens, micro-batch {args.micro_batch}; resident weights {resident:.0f} MiB")
    lines = [head, "", "| pass | last k | row chunk | time (s) | vs logprob | peak extra mem (MiB) |",
             "|---|---|---|---|---|---|"]
    for name, k, chunk, t, m in rows:
        lines.append(f"| {name} | {k} | {chunk} | {t:.3f} | {t / t_lp:.2f}x | {m:.0f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vgr_results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
