"""FP8 vs bf16 training-step speed and log-prob mismatch, per layer spec (one GPU).

For each model shape (random weights, bf16): RL-like samples (prompt ~ U[200, 600],
response lognormal, as tools/bench_train_step.py) packed into micro-batches of at most
`--budget` tokens (padded to a multiple of 16, as FP8 GEMMs need; every config gets the
same streams). Configs: sdpa bf16, te bf16, te fp8 hybrid delayed, te fp8 hybrid tensorwise.

- update step: forward + backward + fused AdamW over all micro-batches (median-free mean of
  `--steps` after `--warmup`); TFLOP/s counts bf16 model FLOPs of the real tokens
  (bench_train_step.step_flops), so fp8 rows earn no extra credit;
- log-prob mismatch: the te configs start from the te-bf16 model's weights; on the first
  micro-batch (eval, no grad, after `--calib` FP8 forwards so delayed scales are set) the
  per-token log-probs of the response tokens are compared with te bf16's: mean / max |diff|.
  Random weights give near-uniform log-probs: a trained model's gap can differ.

    python tools/bench_fp8.py                 # GPU, Transformer Engine needed for the te rows
    python tools/bench_fp8.py --models llama-1b --configs te-bf16,te-fp8-delayed
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rl.models.hf_config import ModelArch  # noqa: E402

MODELS = {
    # Llama-3.2-1B shape (tied): hidden 2048, 16 layers, ffn 8192, vocab 128256; 1.24B parameters.
    "llama-1b": ModelArch("llama", 16, 2048, 32, 8, 64, 8192, 128256, 131072, 500000.0, 1e-5, True, False),
    # SmolLM2-1.7B shape (tied, MHA): hidden 2048, 24 layers, 32 KV heads, ffn 8192, vocab 49152.
    "smollm2-1.7b": ModelArch("llama", 24, 2048, 32, 32, 64, 8192, 49152, 8192, 130000.0, 1e-5, True, False),
    "tiny": ModelArch("llama", 2, 64, 4, 2, 16, 128, 96, 256, 10000.0, 1e-5, True, False),
}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    spec: str                 # layer spec
    fp8: str = "none"         # model.fp8
    recipe: str = "delayed"   # model.fp8_recipe


CONFIGS = {c.name: c for c in (
    BenchConfig("sdpa-bf16", "sdpa"),
    BenchConfig("te-bf16", "te"),
    BenchConfig("te-fp8-delayed", "te", "hybrid", "delayed"),
    BenchConfig("te-fp8-tensorwise", "te", "hybrid", "tensorwise"),
)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-1b,smollm2-1.7b")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--samples", type=int, default=24, help="RL samples per step")
    ap.add_argument("--seq", type=int, default=4096, help="max prompt + response length")
    ap.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--calib", type=int, default=2, help="FP8 forwards before the mismatch forward")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for m in args.models.split(","):
        if m not in MODELS:
            ap.error(f"--models: unknown {m!r}; valid {sorted(MODELS)}")
    for c in args.configs.split(","):
        if c not in CONFIGS:
            ap.error(f"--configs: unknown {c!r}; valid {sorted(CONFIGS)}")
    if args.budget < args.seq or args.budget % 16:
        ap.error(f"--budget={args.budget} must be >= --seq={args.seq} and divisible by 16")
    return args


def config_overrides(c: BenchConfig) -> dict:
    from megatron_rl.models.fp8 import fp8_transformer_kwargs
    return fp8_transformer_kwargs(c.fp8, c.recipe) if c.fp8 != "none" else {}


def make_work(arch: ModelArch, args, device):
    """Packed micro-batches (T % 16 == 0), their real-token stats, and the response mask."""
    from tools.bench_train_step import Work, _to, rl_padded_batch
    from megatron_rl.models.packing import packed_microbatches
    ids, am = rl_padded_batch(args.samples, args.seq, arch.vocab_size)
    max_prompt = 600
    w = Work()
    for pk in packed_microbatches(ids, am, args.budget, pad_to_multiple_of=16):
        pk = _to(pk, device)
        labels = pk.next_token_labels()
        loss_mask = (labels != 0).float()
        nxt = pk.cols.roll(-1)
        resp = (labels[0] != 0) & (nxt >= max_prompt) & (pk.rows >= 0)
        w.microbatches.append(dict(packed=pk, labels=labels, loss_mask=loss_mask, resp=resp))
        lens = (pk.cu_seqlens[1:] - pk.cu_seqlens[:-1]).tolist()
        real = lens if int((pk.rows < 0).sum()) == 0 else lens[:-1]
        w.tokens += sum(real)
        w.sum_sq += sum(n * n for n in real)
    return w


@torch.no_grad()
def response_logprobs(model, mb) -> torch.Tensor:
    from megatron_rl.models.packing import packed_forward
    model.eval()
    logits = packed_forward(model, mb["packed"])[0].float()          # [T, V]
    lp = torch.log_softmax(logits, -1).gather(-1, mb["labels"][0].clamp(min=0)[:, None])[:, 0]
    model.train()
    return lp[mb["resp"]]


def run_config(arch, c: BenchConfig, args, w, device, peak, base):
    """One row; `base` holds te-bf16's initial weights and log-probs once measured."""
    from tools.bench_train_step import matmul_params, step_flops, time_steps
    from megatron_rl.models import build_model
    model = build_model(arch, dtype="bfloat16", layer_spec=c.spec, **config_overrides(c))
    model.train()
    row = dict(config=c.name, spec=c.spec, fp8=c.fp8, recipe=c.recipe if c.fp8 != "none" else "-")
    if c.spec == "te":
        try:
            if "params" not in base:
                base["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            else:
                for n, p in model.named_parameters():
                    p.data.copy_(base["params"][n])
            for _ in range(args.calib if c.fp8 != "none" else 0):
                response_logprobs(model, w.microbatches[0])
            lp = response_logprobs(model, w.microbatches[0])
            if "lp" not in base and c.fp8 == "none":
                base["lp"] = lp
            if "lp" in base:
                d = (lp - base["lp"]).abs()
                row.update(lp_mean_abs=float(d.mean()), lp_max_abs=float(d.max()), resp_tokens=int(d.numel()))
        except Exception as e:   # the timing below still runs
            row["lp_error"] = f"{type(e).__name__}: {e}"[:200]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    secs = time_steps(model, opt, w, device, args.warmup, args.steps)
    tflops = step_flops(matmul_params(model, arch), arch, w) / secs / 1e12
    row.update(step_s=round(secs, 4), tokens_per_s=round(w.tokens / secs), tflops=round(tflops, 1),
               pct_bf16_peak=round(100 * tflops / peak, 1) if peak == peak else None,
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1))
    del model, opt
    return row


def fp8_matmul_peak(device, n: int = 8192, iters: int = 50) -> float:
    """E4M3 x E4M3 -> bf16 `torch._scaled_mm` at n^3, TFLOP/s (nan where unsupported)."""
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()   # column-major
        one = torch.tensor(1.0, device=device)
        for _ in range(5):
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12
    except Exception as e:
        print(f"fp8 matmul peak: {type(e).__name__}: {e}"[:200], flush=True)
        return float("nan")


def _fmt(v, nd=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-2 and v else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def format_table(rows) -> str:
    head = ("| model | config | step s | tokens/s | TFLOP/s | % bf16 peak | vs te-bf16 | peak GiB "
            "| log-prob mean abs diff | max abs diff |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    te_step = {r["model"]: r["step_s"] for r in rows if r.get("config") == "te-bf16" and "step_s" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | error: {r['error'][:150]} | | | | | | | |")
            continue
        speed = f"{te_step[r['model']] / r['step_s']:.2f}x" if r["model"] in te_step else "-"
        lp = ("-", "-") if "lp_mean_abs" not in r else (_fmt(r["lp_mean_abs"]), _fmt(r["lp_max_abs"]))
        if "lp_error" in r:
            lp = (f"error: {r['lp_error'][:60]}", "-")
        lines.append(f"| {r['model']} | {r['config']} | {_fmt(r['step_s'])} | {r['tokens_per_s']} | {r['tflops']} | "
                     f"{_fmt(r.get('pct_bf16_peak'))} | {speed} | {r['peak_mem_gib']} | {lp[0]} | {lp[1]} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from tools.bench_train_step import matmul_peak
    from megatron_rl.models.layer_specs import te_available
    from megatron_rl.parallel import init_distributed
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8.py needs a CUDA GPU")
    init_distributed()
    device = torch.device("cuda", torch.cuda.current_device())
    peak, peak8 = matmul_peak(device), fp8_matmul_peak(device)
    te_ver = "absent"
    if te_available():
        import transformer_engine
        te_ver = getattr(transformer_engine, "__version__", "?")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; transformer_engine {te_ver}; "
          f"matmul peak (8192^3): bf16 {peak:.0f}, fp8 {peak8:.0f} TFLOP/s", flush=True)
    rows = []
    for model_name in args.models.split(","):
        arch = MODELS[model_name]
        t0 = time.perf_counter()
        try:
            w = make_work(arch, args, device)
        except Exception as e:
            rows.append(dict(model=model_name, config="(batch)", error=f"{type(e).__name__}: {e}"[:300]))
            print(json.dumps(rows[-1]), flush=True)
            continue
        print(f"{model_name}: {args.samples} samples, {w.tokens} real tokens in {len(w.microbatches)} packed "
              f"micro-batches of <= {args.budget}", flush=True)
        base: dict = {}
        for name in args.configs.split(","):
            c = CONFIGS[name]
            if c.spec == "te" and not te_available():
                row = dict(config=name, error="transformer_engine not importable")
            else:
                try:
                    row = run_config(arch, c, args, w, device, peak, base)
                except Exception as e:   # one failing config must not lose the others
                    row = dict(config=name, error=f"{type(e).__name__}: {e}"[:300])
            row = dict(model=model_name, **row)
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        base.clear()
        del w
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{model_name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n" + format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
