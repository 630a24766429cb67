"""Vocab-parallel log-prob + entropy at TP=N: fused kernel vs Megatron's naive path.

Each rank holds bf16 logits [tokens, vocab/N] (its vocabulary slice). Timed forward +
backward of
  naive   Megatron's `vocab_parallel_cross_entropy` on a float32 copy of the logits
          (what the usual RL loss does) plus the entropy from the same float32 softmax
  fused   `token_logprob_entropy(..., tp_group, inplace_backward=True)` (Triton; no
          float32 copy, gradient written into the logits)
and the peak memory each needs beyond the logits. The two paths' log-probs are compared.

    torchrun --standalone --nproc-per-node 8 tools/bench_fused_loss_tp.py --tokens 32768 --vocab 128256
    torchrun --standalone --nproc-per-node 2 tools/bench_fused_loss_tp.py --tokens 1024 --vocab 4096  # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def naive(logits, labels, group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    lf = logits.float()
    lp = -vocab_parallel_cross_entropy(lf[:, None].clone(), labels[:, None]).squeeze(1)
    m = lf.max(-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = (lf - m).exp()
    z = e.sum(-1, keepdim=True)
    dist.all_reduce(z, group=group)    # (no autograd through the reduce: entropy is a metric here)
    p = e / z
    ent = -(p * (lf - m - z.log())).sum(-1)
    dist.all_reduce(ent, group=group)
    return lp, ent


def fused(logits, labels, group):
    from megatron_rl.kernels import token_logprob_entropy

    return token_logprob_entropy(logits, labels, group, inplace_backward=True)


def run(method, base, labels, group, iters, on_gpu):
    times, peak = [], 0.0
    for i in range(iters + 1):
        logits = base.clone().requires_grad_()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        lp, _ = method(logits, labels, group)
        lp.float().sum().backward()
        if on_gpu:
            torch.cuda.synchronize()
            peak = max(peak, (torch.cuda.max_memory_allocated() - start_mem) / 2**30)
        if i:   # the first call compiles / warms up
            times.append(time.perf_counter() - t0)
        out = lp.detach().float()
        del logits, lp
    return sum(times) / len(times), peak, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from megatron_rl.parallel import destroy_distributed, init_distributed

    from megatron.core import parallel_state as mpu
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    init_distributed(tp=world, pp=1)
    group, tp, rank = mpu.get_tensor_model_parallel_group(), world, dist.get_rank()
    on_gpu = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if args.vocab % tp:
        raise SystemExit(f"--vocab {args.vocab} must divide by the TP size {tp}")
    v_local = args.vocab // tp
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(dev)
    g.manual_seed(1 + rank)
    base = (torch.randn(args.tokens, v_local, generator=g) * 2).to(dev, torch.bfloat16 if on_gpu else torch.float32)
    logits_gib = base.numel() * base.element_size() / 2**30
    rows = {}
    for name, fn in (("naive (fp32 copy)", naive), ("fused (Triton, in-place)", fused)):
        t, peak, lp = run(fn, base, labels, group, args.iters, on_gpu)
        rows[name] = {"ms": 1000 * t, "extra_gib": peak - logits_gib if on_gpu else None, "lp": lp}
    diff = float((rows["naive (fp32 copy)"]["lp"] - rows["fused (Triton, in-place)"]["lp"]).abs().max())
    if rank == 0:
        print(f"\nTP={tp}, {args.tokens} tokens x vocab {args.vocab} ({v_local}/rank), logits {logits_gib:.2f} GiB/rank, "
              f"{'bf16 ' + torch.cuda.get_device_name() if on_gpu else 'fp32 cpu'}; log-prob max diff {diff:.2e}")
        print("| method | fwd+bwd ms | extra memory GiB/rank (beyond the logits, gradient included) |")
        print("|---|---|---|")
        for name, r in rows.items():
            extra = f"{r['extra_gib']:.2f}" if r["extra_gib"] is not None else "n/a"
            print(f"| {name} | {r['ms']:.1f} | {extra} |")
        if args.json:
            Path(args.json).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "lp"}
                                                   for k, v in rows.items()} | {"lp_max_diff": diff}))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
