"""Generation throughput with and without SAE steering, same model, prompts and run.

Native engine, greedy, a random SmolLM2-135M-shaped model (bf16 on GPU) and a random
SAE (d_sae 4608) at layer 15; additive steering of one feature. Reports tokens/s and
the overhead of steering, median of `--reps` runs each, alternating.

    python tools/bench_steering.py --model-config .cache/demo/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import transformers

    from megatron_rl.data.batch import Batch
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams
    from megatron_rl.steering import SAE, build_steering
    from megatron_rl.steering.config import SteeringConfig
    from tools.gpu_validate import make_random_model

    model_dir = make_random_model(args.model_config, Path("/tmp/smollm2-random"))
    init_distributed()
    gpu = torch.cuda.is_available()
    model = load_checkpoint(model_dir, dtype="bfloat16" if gpu else "float32", layer_spec="sdpa" if gpu else "local")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    d_in, d_sae = model.config.hidden_size, 8 * model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    sae = SAE({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.15.hook_resid_post"},
              {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.05, "b_enc": torch.zeros(d_sae),
               "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.05, "b_dec": torch.zeros(d_in)})
    cfg = SteeringConfig(enable=True, sae_path="(in memory)", mode="add", feature_idxs=[7], strengths=[4.0],
                         max_activations=[2.0])
    texts = [f"Write a short story about the number {i}." for i in range(args.batch)]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    batch = Batch({"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"]},
                  [{"uid": str(i)} for i in range(args.batch)])
    sp = SamplingParams(greedy=True, max_new_tokens=args.new_tokens)
    plain = NativeEngine(model, tok)
    ctl = build_steering(cfg, model, sae=sae)
    steered = NativeEngine(model, tok, steering=ctl)
    ctl.detach()

    def timed(engine, steer: bool) -> float:
        if steer:
            ctl.attach(model)
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine.generate(batch, sp)
        if gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if steer:
            ctl.detach()
        return float(out["response_mask"].sum()) / dt

    timed(plain, False)       # warm-up
    timed(steered, True)
    base, steer = [], []
    for _ in range(args.reps):
        base.append(timed(plain, False))
        steer.append(timed(steered, True))
    b, s = statistics.median(base), statistics.median(steer)
    dev = torch.cuda.get_device_name(0) if gpu else "cpu"
    print(f"device: {dev}; batch {args.batch} x {args.new_tokens} new tokens, greedy, SAE d_sae={d_sae} at layer 15")
    print("| engine | steering | tokens/s (median of %d) | overhead |" % args.reps)
    print("|---|---|---:|---:|")
    print(f"| native | off | {b:.0f} | |")
    print(f"| native | additive, 1 feature, 1 layer | {s:.0f} | {100 * (b - s) / b:+.1f}% |")


if __name__ == "__main__":
    main()
