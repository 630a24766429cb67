"""Weight sync at scale: a Llama-3-70B-shaped slice (4 layers by default) in a TP=N (or TP x PP)
training layout, gathered into HF-layout buckets and received by rank 0, as the colocated
vLLM transport does; time and GB/s, extrapolated to the full 80-layer model.

Run under torchrun; the other parts of the 8-GPU check are separate stages of
`tools/gpu_session.sh scale` (measure_peak_memory for the step time / memory / planner,
bench_fused_loss_tp for the fused loss at TP=N).

    torchrun --standalone --nproc-per-node 8 tools/gpu_scale_check.py --tp 8
    torchrun --standalone --nproc-per-node 8 tools/gpu_scale_check.py --tp 4 --pp 2
    torchrun --standalone --nproc-per-node 2 tools/gpu_scale_check.py --tp 2 --tiny      # CPU smoke
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

from megatron_rl.plan import memory as mp  # noqa: E402


class ReceiveIntoBuffers:
    """Rank 0 copies every bucket into pre-allocated destination tensors (the engine's
    weights); the other ranks only take part in the gathers. Stands in for vLLM's
    `load_weights`, minus its name mapping."""

    def __init__(self, named_shapes: dict, device, is_receiver: bool):
        self.is_receiver = is_receiver
        self.dest = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in named_shapes.items()} \
            if is_receiver else {}

    def begin(self) -> None:
        pass

    def send(self, bucket) -> None:
        for p in bucket.pieces:
            flat = self.dest[p.name].view(-1).view(torch.uint8)
            flat[p.start:p.start + p.nbytes].copy_(bucket.buffer[p.offset:p.offset + p.nbytes])

    def end(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--full-layers", type=int, default=80, help="extrapolate to this many layers")
    ap.add_argument("--bucket-mb", type=float, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from megatron_rl.models import build_model, iter_hf_weights
    from megatron_rl.models.hf_config import ModelArch
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.weight_sync import sync_weights

    init_distributed(tp=args.tp, pp=args.pp)
    on_gpu = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    s = mp.Shape(args.layers, 64, 4, 2, 16, 128, 256, tie_word_embeddings=False) if args.tiny else \
        mp.PRESETS["llama3-70b"]
    arch = ModelArch("llama", args.layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim,
                     s.ffn_hidden_size, s.vocab_size, 4096, 500000.0, 1e-5, False, False,
                     hf_architecture="LlamaForCausalLM")
    dtype = "bfloat16" if on_gpu else "float32"
    model = build_model(arch, dtype=dtype)
    rank = dist.get_rank()
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in iter_hf_weights(model)}
    rx = ReceiveIntoBuffers(shapes, dev, rank == 0)
    results = []
    for _ in range(args.reps + 1):      # the first pass warms up NCCL communicators and the allocator
        dist.barrier()
        t0 = time.perf_counter()
        m = sync_weights(iter_hf_weights(model), rx, bucket_mb=args.bucket_mb, is_sender=rank == 0)
        dist.barrier()
        results.append((time.perf_counter() - t0, m.get("weight_sync/bytes", 0.0)))
    secs = sorted(r[0] for r in results[1:])[len(results[1:]) // 2]
    nbytes = max(r[1] for r in results)
    mismatch = 0.0
    for name, t in iter_hf_weights(model):          # what arrived equals the gathered weights
        if rank == 0:
            mismatch = max(mismatch, float((rx.dest[name].float() - t.float()).abs().max()))
    if rank != 0:
        destroy_distributed()
        return 0
    emb = 2 * s.vocab_size * s.hidden_size * (2 if on_gpu else 4)
    per_layer = (nbytes - emb) / args.layers
    full_bytes = emb + per_layer * args.full_layers
    row = {"layout": f"TP={args.tp} PP={args.pp}", "max_abs_mismatch": mismatch, "layers": args.layers, "gb": nbytes / 1e9, "seconds": secs,
           "gbps": nbytes / secs / 1e9, "full_layers": args.full_layers, "full_gb": full_bytes / 1e9,
           "full_seconds_est": full_bytes / (nbytes / secs), "device": torch.cuda.get_device_name() if on_gpu else "cpu"}
    print(f"\nweight sync, Llama-3-70B shape cut to {args.layers} layers, {row['layout']} -> rank 0 HF layout, "
          f"bucket {args.bucket_mb:.0f} MB, {dtype}, {row['device']}; received == gathered: max diff {mismatch:.1e}")
    print("| layout | GB synced | seconds | GB/s | est. GB at 80 layers | est. seconds at 80 layers |")
    print("|---|---|---|---|---|---|")
    print(f"| {row['layout']} | {row['gb']:.2f} | {secs:.3f} | {row['gbps']:.1f} | {row['full_gb']:.1f} | "
          f"{row['full_seconds_est']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
