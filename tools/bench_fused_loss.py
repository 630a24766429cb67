"""Time and peak extra memory of naive vs fused log-prob/entropy forward+backward.

For (tokens, vocab) in {8192, 32768} x {49152, 128256, 152064}, bf16 logits:
  naive-lp       log_softmax(logits.float()).gather(...)             (the usual way, log-prob only)
  naive-lp+ent   the same plus entropy -(p * logp).sum(-1)
  fused          token_logprob_entropy (Triton), gradient in a new buffer
  fused-inplace  token_logprob_entropy(..., inplace_backward=True), gradient into the logits
next to the bandwidth floor: read the logits once + write the gradient once at the
device-to-device copy bandwidth measured in the same run. "extra" is the peak
allocation above logits + inputs during forward+backward, the returned gradient
included (so out-of-place methods carry >= 100% for it). Shapes/methods that do not
fit are reported as OOM. With --sweep, first times Triton launch configs on one shape
and uses the fastest. A second table times the LM head + log-prob/entropy
(hidden 4096): matmul then kernel vs ``linear_token_logprob`` (no full logits).

    PYTHONPATH=. python tools/bench_fused_loss.py [--sweep] [--iters 10]
"""
from __future__ import annotations

import argparse
import gc
import statistics

import torch

from megatron_rl.kernels import linear_token_logprob, token_logprob_entropy
from megatron_rl.kernels import triton_logprob

TOKENS = (8192, 32768)
VOCABS = (49152, 128256, 152064)
SWEEP = [(1, 2048, 4), (1, 4096, 4), (1, 4096, 8), (1, 8192, 8), (1, 8192, 16), (1, 16384, 16),
         (2, 2048, 8), (2, 4096, 8), (4, 1024, 4), (4, 2048, 8)]


def naive_lp(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), None


def naive_lp_ent(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def fused(logits, labels):
    return token_logprob_entropy(logits, labels)


def fused_inplace(logits, labels):
    return token_logprob_entropy(logits, labels, inplace_backward=True)


METHODS = {"naive-lp": (naive_lp, False), "naive-lp+ent": (naive_lp_ent, False),
           "fused": (fused, False), "fused-inplace": (fused_inplace, True)}


def copy_bandwidth(nbytes=2 << 30, iters=20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3)


def fwd_bwd(fn, leaf, labels, g_lp, g_h, inplace):
    logits = leaf.clone() if inplace else leaf  # in-place needs a non-leaf, as an LM head output is
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start.record()
    lp, h = fn(logits, labels)
    loss = (lp * g_lp).sum() + ((h * g_h).sum() if h is not None else 0)
    (grad,) = torch.autograd.grad(loss, logits)
    end.record()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del lp, h, loss, grad, logits
    return start.elapsed_time(end), extra


def measure(fn, leaf, labels, g_lp, g_h, inplace, iters):
    fwd_bwd(fn, leaf, labels, g_lp, g_h, inplace)  # warm-up / compile
    runs = [fwd_bwd(fn, leaf, labels, g_lp, g_h, inplace) for _ in range(iters)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def make_inputs(tokens, vocab):
    leaf = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16).mul_(3).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    return leaf, labels, torch.randn(tokens, device="cuda"), torch.randn(tokens, device="cuda")


def sweep(tokens=8192, vocab=128256, iters=5):
    """Pick the fastest forward and backward launch configs (timed through the full fwd+bwd)."""
    leaf, labels, g_lp, g_h = make_inputs(tokens, vocab)
    best = {}
    for kind in ("fwd", "bwd"):
        times = {}
        for cfg in SWEEP:
            triton_logprob.CONFIG[kind] = cfg
            try:
                times[cfg] = measure(fused, leaf, labels, g_lp, g_h, False, iters)[0]
            except Exception as exc:  # a config may not compile (registers / shared memory)
                print(f"sweep {kind} {cfg}: {type(exc).__name__}")
        best[kind] = min(times, key=times.get)
        triton_logprob.CONFIG[kind] = best[kind]
        print(f"sweep {kind} (M, BLOCK_V, warps) -> ms fwd+bwd: "
              + ", ".join(f"{c}: {t:.2f}" for c, t in sorted(times.items(), key=lambda kv: kv[1])))
    print(f"using CONFIG = {best}")
    del leaf
    gc.collect()
    torch.cuda.empty_cache()


def linear_table(tokens=8192, hidden_size=4096, vocabs=(128256, 152064), iters=5):
    """LM head + log-prob/entropy: matmul then fused kernel vs linear_token_logprob (no full logits)."""
    print("\n| tokens | hidden | vocab | logits GB | method | fwd+bwd ms | peak extra GB | extra % logits |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for vocab in vocabs:
        hidden = (torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16)).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        labels = torch.randint(0, vocab, (tokens,), device="cuda")
        g = torch.randn(tokens, device="cuda")
        methods = {
            "matmul + naive-lp+ent": lambda: naive_lp_ent(hidden @ weight.T, labels),
            "matmul + fused-inplace": lambda: token_logprob_entropy(hidden @ weight.T, labels, inplace_backward=True),
            "linear_token_logprob": lambda: linear_token_logprob(hidden, weight, labels),
        }
        nbytes = tokens * vocab * 2
        for name, fn in methods.items():
            try:
                runs = []
                for _ in range(iters + 1):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    start.record()
                    lp, h = fn()
                    grads = torch.autograd.grad((lp * g + h * g).sum(), (hidden, weight))
                    end.record()
                    torch.cuda.synchronize()
                    runs.append((start.elapsed_time(end), torch.cuda.max_memory_allocated() - base))
                    del lp, h, grads
                ms, extra = statistics.median(r[0] for r in runs[1:]), max(r[1] for r in runs[1:])
                print(f"| {tokens} | {hidden_size} | {vocab} | {nbytes / 1e9:.2f} | {name} | {ms:.2f} | "
                      f"{extra / 1e9:.2f} | {100 * extra / nbytes:.0f}% |", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {tokens} | {hidden_size} | {vocab} | {nbytes / 1e9:.2f} | {name} | OOM | | |", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        del hidden, weight
        gc.collect()
        torch.cuda.empty_cache()


def profile(tokens=8192, vocab=49152):
    """Kernel-level breakdown of one fused-inplace forward+backward (torch.profiler)."""
    leaf, labels, g_lp, g_h = make_inputs(tokens, vocab)
    measure(fused_inplace, leaf, labels, g_lp, g_h, True, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd_bwd(fused_inplace, leaf, labels, g_lp, g_h, True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", action="store_true", help="also print a kernel breakdown at 8192 x 49152")
    ap.add_argument("--no-linear", action="store_true", help="skip the LM-head (linear_token_logprob) table")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB)  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}")
    if args.profile:
        profile()
    if args.sweep:
        sweep()
    bw = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s  CONFIG={triton_logprob.CONFIG}\n")
    print("| tokens | vocab | logits GB | floor ms | method | fwd+bwd ms | x floor | peak extra GB | extra % logits |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for tokens in TOKENS:
        for vocab in VOCABS:
            nbytes = tokens * vocab * 2
            floor_ms = 2 * nbytes / bw * 1e3
            try:
                leaf, labels, g_lp, g_h = make_inputs(tokens, vocab)
            except torch.cuda.OutOfMemoryError:
                print(f"| {tokens} | {vocab} | {nbytes / 1e9:.2f} | {floor_ms:.2f} | (inputs) | OOM | | | |")
                continue
            for name in args.methods.split(","):
                fn, inplace = METHODS[name]
                try:
                    ms, extra = measure(fn, leaf, labels, g_lp, g_h, inplace, args.iters)
                    print(f"| {tokens} | {vocab} | {nbytes / 1e9:.2f} | {floor_ms:.2f} | {name} | {ms:.2f} | "
                          f"{ms / floor_ms:.2f} | {extra / 1e9:.2f} | {100 * extra / nbytes:.0f}% |", flush=True)
                except torch.cuda.OutOfMemoryError:
                    print(f"| {tokens} | {vocab} | {nbytes / 1e9:.2f} | {floor_ms:.2f} | {name} | OOM (skipped) | | | |",
                          flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            del leaf, labels, g_lp, g_h
            gc.collect()
            torch.cuda.empty_cache()
    if not args.no_linear:
        linear_table(iters=args.iters)


if __name__ == "__main__":
    main()
