"""Training-step throughput of Megatron-Core GPT models per layer spec, padded vs packed.

One process, one GPU. A step is forward + backward + `torch.optim.AdamW(fused)` on
bf16 parameters, over several micro-batches:

- dense:     every row is `--seq` real tokens (the kernel-speed number);
- rl-padded: an RL-like batch (prompt ~ U[200, 600], response ~ lognormal with a long
             tail, total <= --seq) as `[left-padded prompt | right-padded response]`
             rows of `--seq` tokens, one row per micro-batch, with a padding mask;
- rl-packed: the same samples packed into `[1, T]` streams of at most
             `--seq` tokens per micro-batch (`megatron_rl.models.packing`);
             rl-packed-4x: a 4 * `--seq` token budget per micro-batch;
- dense-mbs2: two dense rows per micro-batch (bigger GEMMs).

FLOPs counted (model FLOPs of the real tokens only, so padded and packed runs of
the same samples are credited the same work):

    FLOPs = 6 * N_matmul * tokens + 6 * L * (heads * head_dim) * sum_i s_i^2

N_matmul = parameters of the linear layers incl. the output projection (the input
embedding lookup is not a matmul; with tied embeddings the shared matrix counts
once, as the output projection). The second term is causal attention: QK^T and
AV are 2 * 2 * s^2 * heads * head_dim FLOPs forward per layer and sequence, halved
by the causal mask, times 3 for forward + backward (= 12 * L * h * s^2 / 2).
The peak is measured in the same run: an 8192^3 bf16 matmul.

    python tools/bench_train_step.py            # GPU
    python tools/bench_train_step.py --tiny     # CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rl.models.hf_config import ModelArch  # noqa: E402

MODELS = {
    # Llama-3.2-1B shape (tied embeddings): 1.24B parameters.
    "llama-1b": ModelArch("llama", 16, 2048, 32, 8, 64, 8192, 128256, 131072, 500000.0, 1e-5, True, False),
    # Llama-3-8B shape with layers cut to 8 so local attention fits: 2.8B parameters.
    "llama-8b-8l": ModelArch("llama", 8, 4096, 32, 8, 128, 14336, 128256, 131072, 500000.0, 1e-5, False, False),
    "tiny": ModelArch("llama", 2, 64, 4, 2, 16, 128, 96, 256, 10000.0, 1e-5, True, False),
}


@dataclass
class Work:
    """Micro-batches of one step plus the real-token statistics used for FLOPs."""
    microbatches: list = field(default_factory=list)   # dicts: input_ids, position_ids, mask/packed, labels, loss_mask
    tokens: int = 0
    sum_sq: int = 0


def rl_lengths(n: int, seq: int, seed: int = 0, scale: int = 1):
    """(prompt, response) lengths: prompt U[200, 600], response lognormal(median 700,
    sigma 1) cut at seq - prompt; all divided by `scale` (tiny smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(200, 601, (n,), generator=g) // scale
    resp = (torch.exp(math.log(700) + 1.0 * torch.randn(n, generator=g)) / scale).long().clamp(min=1)
    resp = resp.clamp(max=seq - 600 // scale)
    return prompt.tolist(), resp.tolist()


def rl_padded_batch(n: int, seq: int, vocab: int, seed: int = 0, scale: int = 1):
    max_prompt = 600 // scale
    prompt, resp = rl_lengths(n, seq, seed, scale)
    ids = torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(seed + 1))
    am = torch.zeros(n, seq, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt, resp)):
        am[i, max_prompt - p: max_prompt + r] = 1
    return ids * am, am


def dense_work(rows: int, seq: int, vocab: int, device, mbs: int = 1) -> Work:
    w = Work()
    for i in range(0, rows, mbs):
        ids = torch.randint(1, vocab, (mbs, seq), generator=torch.Generator().manual_seed(i)).to(device)
        w.microbatches.append(dict(input_ids=ids, position_ids=torch.arange(seq, device=device)[None].expand(mbs, -1),
                                   mask=None, labels=ids.roll(-1, 1), loss_mask=torch.ones(mbs, seq, device=device)))
        w.tokens += mbs * seq
        w.sum_sq += mbs * seq * seq
    return w


def padded_work(ids, am, device) -> Work:
    from megatron_rl.models.forward import causal_padding_mask, position_ids_from_mask
    w = Work()
    for i in range(ids.size(0)):
        x, m = ids[i:i + 1].to(device), am[i:i + 1].to(device)
        w.microbatches.append(dict(input_ids=x, position_ids=position_ids_from_mask(m),
                                   mask=causal_padding_mask(m), labels=x.roll(-1, 1),
                                   loss_mask=(m * m.roll(-1, 1)).float()))
        n = int(m.sum())
        w.tokens += n
        w.sum_sq += n * n
    return w


def packed_work(ids, am, budget: int, device) -> Work:
    from megatron_rl.models.packing import packed_microbatches
    w = Work()
    for pk in packed_microbatches(ids, am, budget):
        pk = _to(pk, device)
        labels = pk.next_token_labels()
        loss_mask = (labels != 0).float()
        w.microbatches.append(dict(packed=pk, labels=labels, loss_mask=loss_mask))
        lens = (pk.cu_seqlens[1:] - pk.cu_seqlens[:-1]).tolist()
        w.tokens += sum(lens)
        w.sum_sq += sum(n * n for n in lens)
    return w


def _to(pk, device):
    from dataclasses import replace
    return replace(pk, **{k: getattr(pk, k).to(device) for k in
                          ("input_ids", "position_ids", "cu_seqlens", "rows", "cols")})


def matmul_params(model, arch: ModelArch) -> int:
    total = sum(p.numel() for p in model.parameters())
    return total - (0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size)


def step_flops(n_matmul: int, arch: ModelArch, w: Work) -> float:
    return 6.0 * n_matmul * w.tokens + 6.0 * arch.num_layers * arch.num_heads * arch.head_dim * w.sum_sq


def train_step(model, opt, w: Work):
    from megatron_rl.models.packing import packed_forward
    total = sum(float(mb["loss_mask"].sum()) for mb in w.microbatches)
    for mb in w.microbatches:
        if "packed" in mb:
            loss = packed_forward(model, mb["packed"], labels=mb["labels"])
        else:
            loss = model(mb["input_ids"], mb["position_ids"], mb["mask"], labels=mb["labels"])
        ((loss.float() * mb["loss_mask"]).sum() / total).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, w: Work, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        train_step(model, opt, w)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, w)
    sync(device)
    return (time.perf_counter() - t0) / steps


def matmul_peak(device, n: int = 8192, iters: int = 50) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def register_bench_specs():
    """Ablations of "sdpa" (= SDPA attention + fused SwiGLU + compiled RMSNorm on GPU):
    'sdpa-attn' has only the attention change, 'sdpa-attn-swiglu' adds the fused SwiGLU."""
    from megatron_rl.models.layer_specs import LAYER_SPECS, register_layer_spec
    from megatron_rl.models.sdpa_attention import sdpa_layer_spec
    if "sdpa-attn" not in LAYER_SPECS:
        register_layer_spec("sdpa-attn")(
            lambda qk_layernorm=False: sdpa_layer_spec(qk_layernorm, fused_swiglu=False, compiled_norm=False))
        register_layer_spec("sdpa-attn-swiglu")(
            lambda qk_layernorm=False: sdpa_layer_spec(qk_layernorm, fused_swiglu=True, compiled_norm=False))


def run_case(model_name, spec, mode, args, device, peak, n_rl):
    from megatron_rl.models import build_model
    arch = MODELS[model_name]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = build_model(arch, dtype=dtype, layer_spec=spec)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    if mode.startswith("dense"):   # dense | dense-mbs2: rows per micro-batch
        mbs = int(mode.split("-mbs")[1]) if "-mbs" in mode else 1
        w = dense_work(args.rows, args.seq, arch.vocab_size, device, mbs)
    else:                          # rl-padded | rl-packed | rl-packed-4x (token budget 4 * seq)
        ids, am = rl_padded_batch(n_rl, args.seq, arch.vocab_size, scale=args.len_scale)
        budget = args.seq * (int(mode.split("-")[-1][:-1]) if mode.endswith("x") else 1)
        w = padded_work(ids, am, device) if mode == "rl-padded" else packed_work(ids, am, budget, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs = time_steps(model, opt, w, device, args.warmup, args.steps)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    tflops = step_flops(matmul_params(model, arch), arch, w) / secs / 1e12
    row = dict(model=model_name, spec=spec, mode=mode, microbatches=len(w.microbatches), tokens=w.tokens,
               step_s=round(secs, 4), tokens_per_s=round(w.tokens / secs), tflops=round(tflops, 1),
               pct_peak=round(100 * tflops / peak, 1) if peak == peak else None,
               peak_mem_gib=round(mem, 1) if mem == mem else None,
               params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3))
    del model, opt, w
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-1b,llama-8b-8l")
    ap.add_argument("--specs", default="local,sdpa-attn,sdpa-attn-swiglu,sdpa,te", help="te is skipped when not importable")
    ap.add_argument("--modes", default="dense,dense-mbs2,rl-padded,rl-packed,rl-packed-4x")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=4, help="dense rows (= micro-batches) per step")
    ap.add_argument("--rl-samples", type=int, default=16, help="RL samples per step")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.len_scale = 1
    if args.tiny:   # same length distribution, divided by 16
        args.models, args.seq, args.rows, args.rl_samples, args.len_scale = "tiny", 256, 2, 6, 16

    from megatron_rl.models.layer_specs import te_available
    from megatron_rl.parallel import init_distributed
    init_distributed()
    register_bench_specs()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    peak = matmul_peak(device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s", flush=True)
    specs = [s for s in args.specs.split(",") if s != "te" or te_available()]
    if "te" in args.specs.split(",") and "te" not in specs:
        print("te: transformer_engine not importable here, skipped", flush=True)
    rows = []
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            for spec in specs:
                if spec == "te" and mode == "rl-padded":
                    continue   # TE's padding mask needs attn_mask_type=padding_causal; not benchmarked
                if spec.startswith("sdpa-") and not mode.startswith("dense"):
                    continue
                if spec in ("local", "sdpa-attn") and mode in ("dense-mbs2", "rl-packed-4x"):
                    continue   # local: [b, heads, s, s] scores already take ~70 GB at one row
                n_rl = args.rl_samples
                try:
                    row = run_case(model_name, spec, mode, args, device, peak, n_rl)
                except Exception as e:   # keep going: one failing case must not lose the others
                    row = dict(model=model_name, spec=spec, mode=mode, error=f"{type(e).__name__}: {e}"[:300])
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def print_table(rows):
    print("\n| model | spec | mode | micro-batches | real tokens/step | step s | tokens/s | TFLOP/s | % peak | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['spec']} | {r['mode']} | error: {r['error'][:120]} |")
        else:
            print(f"| {r['model']} | {r['spec']} | {r['mode']} | {r['microbatches']} | {r['tokens']} | {r['step_s']} | "
                  f"{r['tokens_per_s']} | {r['tflops']} | {r['pct_peak']} | {r['peak_mem_gib']} |")


if __name__ == "__main__":
    main()
