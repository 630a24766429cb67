"""Where the e2e GRPO update's time goes: one `Policy.update` timed and profiled per variant.

The update of tools/bench_e2e.py without vLLM (issue #20): a random SmolLM2-1.7B-shaped Llama
(bf16, sdpa spec, Megatron DDP + distributed optimizer, built with trainer/build.py's helpers
as `build_actor` builds the actor), GRPO PPO-clip token-mean, on-policy (no old log-prob pass:
`actor.recompute_old_logprob=auto`), 512 rows of 20..24 left-padded prompt + 256 response
tokens (64 prompts x 8 samples: 142k real tokens). Variants (`--variants`):

    padded           actor.micro_batch_size=32 (padded rows, trimmed to their used columns)
    packed           actor.max_tokens_per_microbatch=20480 (packed token-budget streams)
    padded-N / packed-N   the same with micro_batch_size / max_tokens_per_microbatch N
    ...+unfusedrope  the same with Megatron's unfused RoPE (models/rope_fusion.py: fused where TE imports)
    logprob / logprob-N   the log-prob pass alone (`Policy.compute_logprobs`, forward only), packed N

`--models` picks the shapes (smollm2-1.7b, the e2e's; llama-1b; llama-8b-8l, Llama-3-8B cut to 8
layers so the optimizer fits one GPU) and `--specs` the layer specs (sdpa, te): every variant runs
on every (model, spec) pair, one build per pair.

Per variant: wall time of one update (median of `--reps` after a warm-up), TFLOP/s of the real
tokens (tools/bench_train_step.py `step_flops`: 6 N tokens + causal attention), peak allocated
memory, and one update under torch.profiler (CUDA activities only, so the CPU side runs as
unprofiled): CUDA time per kernel category and the top kernels, and GPU idle time (median wall -
union of kernel intervals). "% of peak" is against a bf16 matmul of the update's largest GEMM
shape timed in the same process (and the 8192^3 one for reference). Each variant is guarded.

    python tools/profile_update.py --json /tmp/uprof.json      # GPU (~2-3 min on an H200)
    python tools/profile_update.py --cpu-smoke                 # tiny model, CPU profiler (seconds)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_e2e import PROMPTS, SAMPLES, NEW_TOKENS, SMOLLM2_1_7B  # noqa: E402
from tools.bench_train_step import Work, matmul_params, matmul_peak, step_flops  # noqa: E402

TINY = dict(SMOLLM2_1_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, max_position_embeddings=512)

# Kernel-name categories, first match wins (attention before GEMM: FMHA kernels are cutlass too;
# our Triton log-prob kernels are `_fwd_partials_kernel` / `_bwd_kernel` in kernels/triton_logprob.py).
CATEGORIES = [
    ("attention", r"flash|fmha|efficient_attention|mem_eff|sdpa|attention|aten::_scaled_dot"),
    ("loss/log-softmax", r"_fwd_partials_kernel|^_bwd_kernel|tokenlogprob|log_softmax|logsoftmax|cross_entropy|"
                         r"nll_loss"),
    ("optimizer", r"multi_tensor|adam|l2norm|aten::_foreach|optimizer"),
    ("gemm", r"gemm|cutlass|cublas|nvjet|xmma|splitk|aten::(mm|addmm|bmm|baddbmm|matmul|linear)$"),
    ("communication", r"nccl|gloo|all_reduce|allreduce|reduce_scatter|all_gather"),
    ("norm", r"rms|layer_?norm|rsqrt|aten::native_layer_norm"),
    ("copies/memcpy", r"memcpy|memset|copy|catarray|aten::(cat|copy_|to|_to_copy|contiguous|clone)$"),
    ("elementwise/activation", r"elementwise|vectorized|silu|swiglu|gelu|sigmoid|triton_poi|act_|"
                               r"aten::(mul|add|sub|div|exp|neg|where|fill_|zero_)_?$"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


@dataclass
class Variant:
    label: str
    micro_batch_size: int
    max_tokens_per_microbatch: int
    unfused_rope: bool = False
    forward_only: bool = False           # the log-prob pass instead of the update


def parse_variant(name: str, cpu_smoke: bool) -> Variant:
    """'padded' | 'packed' | 'padded-N' | 'packed-N', each optionally '+unfusedrope' (module docstring)."""
    base, plus, mod = name.partition("+")
    if plus and mod != "unfusedrope":
        raise SystemExit(f"--variants: {name!r}: the only modifier is +unfusedrope")
    kind, _, n = base.partition("-")
    if kind not in ("padded", "packed", "logprob") or (n and not n.isdigit()):
        raise SystemExit(f"--variants: {name!r} is not padded, packed, logprob, padded-N, packed-N or logprob-N")
    mbs, budget = (4, 64) if cpu_smoke else (32, 20480)
    if kind == "padded":
        return Variant(name, int(n) if n else mbs, 0, bool(plus))
    return Variant(name, mbs, int(n) if n else budget, bool(plus), forward_only=kind == "logprob")


def make_batch(rows: int, samples: int, response: int, vocab: int, prompt_range: tuple[int, int], seed: int = 0):
    """`rows` rows of (left-padded prompt, `response` real tokens), one prompt length per group of
    `samples`; GRPO-like advantages (one value per row). Returns (Batch, Work of the real tokens)."""
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    lo, hi = prompt_range
    plen = torch.randint(lo, hi + 1, (rows // samples,), generator=g).repeat_interleave(samples)
    prompt_mask = (torch.arange(hi)[None] >= hi - plen[:, None]).long()          # left padding
    prompt_ids = torch.randint(1, vocab, (rows, hi), generator=g) * prompt_mask
    adv = torch.randn(rows, generator=g)
    batch = Batch({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                   "response_ids": torch.randint(1, vocab, (rows, response), generator=g),
                   "response_mask": torch.ones(rows, response),
                   "advantages": adv[:, None].expand(rows, response).contiguous()},
                  [{"uid": str(i // samples), "group": i // samples} for i in range(rows)])
    lens = (plen + response).tolist()
    return batch, Work(tokens=sum(lens), sum_sq=sum(n * n for n in lens))


def model_arch(name: str):
    """`--models` name -> ModelArch: the e2e's SmolLM2-1.7B shape (or TINY) or bench_train_step's."""
    from megatron_rl.models.hf_config import arch_from_hf_config
    from tools.bench_train_step import MODELS

    hf = {"smollm2-1.7b": SMOLLM2_1_7B, "tiny": TINY}.get(name)
    if hf is not None:
        return arch_from_hf_config({"architectures": ["LlamaForCausalLM"], **hf})
    if name not in MODELS:
        raise SystemExit(f"--models: {name!r} is not one of smollm2-1.7b, tiny, {', '.join(MODELS)}")
    return MODELS[name]


def build_model(arch, gpu: bool, spec: str = "sdpa"):
    """The actor's trunk, DDP and optimizer as `trainer.build.build_trained` makes them (random
    weights instead of `load_model_chunks`): bf16 + `spec` on GPU, fp32 + local on CPU."""
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models.provider import build_model_chunks
    from megatron_rl.trainer.build import build_optimizer, use_distributed_optimizer
    from megatron_rl.trainer.ddp import wrap_ddp_chunks

    dtype = "bfloat16" if gpu else "float32"
    torch.manual_seed(0)
    chunks = build_model_chunks(arch, dtype=dtype, layer_spec=spec if gpu else "local", recompute="none")
    optim = OptimConfig(lr=1e-6)                          # bench_e2e's actor.optim (distributed on GPU)
    ddp = wrap_ddp_chunks(chunks, use_distributed_optimizer(optim))
    opt, sched = build_optimizer(ddp, optim, dtype, 100)
    return arch, chunks, ddp, opt, sched


def make_policy(parts, v: Variant):
    from megatron_rl.plan.run_plan import loss_backend
    from megatron_rl.trainer.policy import Policy

    arch, chunks, ddp, opt, sched = parts
    return Policy(chunks, micro_batch_size=v.micro_batch_size, temperature=1.0, optimizer=opt, scheduler=sched,
                  ddp_model=ddp, fused_backend=loss_backend("auto", "cuda" if torch.cuda.is_available() else "cpu"),
                  max_tokens_per_microbatch=v.max_tokens_per_microbatch)


def largest_gemm(arch, policy, batch) -> tuple[int, int, int]:
    """(M, K, N) of the update's largest matmul: the biggest micro-batch's tokens times the
    output projection or the gated fc1, whichever has more FLOPs."""
    mbs = policy._train_microbatches(batch)          # the layout `update` runs (trim / packing)
    m = max(int(mb["packed"].input_ids.numel()) if "packed" in mb else int(mb["input_ids"].numel()) for mb in mbs)
    del mbs
    return max([(m, arch.hidden_size, arch.vocab_size), (m, arch.hidden_size, 2 * arch.ffn_hidden_size)],
               key=lambda s: s[0] * s[1] * s[2])


def gemm_peak(shape: tuple[int, int, int], gpu: bool, iters: int = 20) -> float:
    """TFLOP/s of one [M, K] x [K, N] matmul (bf16 on GPU, fp32 on CPU), in this process."""
    m, k, n = shape
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(gpu)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(gpu)
    return 2.0 * m * k * n * iters / (time.perf_counter() - t0) / 1e12


def sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def one_update(policy, batch, algos, seed: int, forward_only: bool = False) -> float:
    sync(torch.cuda.is_available())
    t0 = time.perf_counter()
    if forward_only:
        policy.compute_logprobs(batch)
    else:
        policy.update(batch, algos, mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=seed)
    sync(torch.cuda.is_available())
    return time.perf_counter() - t0


def kernel_spans(prof, gpu: bool) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every CUDA kernel / memcpy / memset (GPU), or of every
    leaf CPU op (CPU smoke: an op with children would count them twice)."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if gpu and e.device_type != DeviceType.CUDA:
            continue
        if not gpu and (e.device_type != DeviceType.CPU or e.cpu_children):
            continue
        out.append((e.name, float(e.time_range.start), float(e.time_range.end)))
    return out


def busy_us(spans) -> float:
    """Length of the union of the intervals (kernels on several streams overlap)."""
    total, cur_s, cur_e = 0.0, None, None
    for _, s, e in sorted(spans, key=lambda x: x[1]):
        if cur_e is None or s > cur_e:
            total += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (0.0 if cur_e is None else cur_e - cur_s)


def breakdown(spans, top: int = 15) -> dict:
    """Kernel time per category and the `top` kernels by total time (ms, % of kernel time)."""
    per_name: dict[str, list[float]] = {}
    for name, s, e in spans:
        per_name.setdefault(name, [0.0, 0])
        per_name[name][0] += (e - s) / 1e3
        per_name[name][1] += 1
    total = sum(ms for ms, _ in per_name.values()) or 1.0
    cats: dict[str, list[float]] = {}
    for name, (ms, n) in per_name.items():
        c = cats.setdefault(category(name), [0.0, 0])
        c[0] += ms
        c[1] += n
    pct = lambda ms: round(100.0 * ms / total, 1)
    return {"kernel_ms": round(total, 1),
            "categories": [{"category": c, "ms": round(ms, 1), "pct": pct(ms), "calls": int(n)}
                           for c, (ms, n) in sorted(cats.items(), key=lambda kv: -kv[1][0])],
            "top": [{"kernel": name[:300], "category": category(name), "ms": round(ms, 2), "pct": pct(ms),
                     "calls": int(n)} for name, (ms, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]]}


def profile_update(policy, batch, algos, gpu: bool, seed: int, trace: Path | None = None,
                   forward_only: bool = False) -> tuple[float, list, str]:
    """(wall s, kernel spans, activities) of one profiled update. CUDA activities alone keep the
    host side unprofiled; should that record no kernel (a profiler build quirk), CPU + CUDA."""
    from torch.profiler import ProfilerActivity, profile

    tries = [[ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]] if gpu else [
        [ProfilerActivity.CPU]]
    for acts in tries:
        with profile(activities=acts) as prof:
            wall = one_update(policy, batch, algos, seed, forward_only)
        spans = kernel_spans(prof, gpu)
        if spans:
            break
    if trace is not None:                      # chrome://tracing / Perfetto; gzip keeps it a few MB
        prof.export_chrome_trace(str(trace))
    return wall, spans, "+".join(a.name for a in acts)


@dataclass
class Result:
    label: str
    micro_batch_size: int
    max_tokens_per_microbatch: int
    microbatches: int = 0
    real_tokens: int = 0
    update_s: float = 0.0
    update_runs_s: list = field(default_factory=list)
    tflops: float = 0.0                  # step_flops: 6 N tokens + causal attention
    tflops_6n: float = 0.0               # 6 N tokens only (docs/BENCHMARKS.md's e2e number)
    gemm_shape: tuple = ()
    gemm_peak_tflops: float = 0.0
    pct_gemm_peak: float = 0.0
    peak_mem_gib: float | None = None
    rope_fusion: bool = False
    profiled_wall_s: float = 0.0
    profiler_activities: str = ""
    busy_s: float = 0.0
    idle_s: float = 0.0
    idle_pct: float = 0.0
    profile: dict = field(default_factory=dict)
    profile_error: str | None = None
    error: str | None = None


def run_variant(parts, v: Variant, batch, work: Work, reps: int, gpu: bool, trace_dir: Path | None = None) -> Result:
    from megatron_rl.algos.config import AlgosConfig

    arch, config = parts[0], parts[1][0].config     # every attention layer reads this shared config
    fused = config.apply_rope_fusion
    config.apply_rope_fusion = fused and not v.unfused_rope
    try:
        return _run_variant(parts, v, batch, work, reps, gpu, trace_dir)
    finally:
        config.apply_rope_fusion = fused


def _run_variant(parts, v: Variant, batch, work: Work, reps: int, gpu: bool, trace_dir: Path | None) -> Result:
    from megatron_rl.algos.config import AlgosConfig

    arch = parts[0]
    algos = AlgosConfig(adv_estimator="grpo", policy_loss="ppo", loss_agg_mode="token-mean", use_kl_loss=False)
    policy = make_policy(parts, v)
    r = Result(v.label, v.micro_batch_size, v.max_tokens_per_microbatch, real_tokens=work.tokens,
               rope_fusion=bool(parts[1][0].config.apply_rope_fusion))
    r.microbatches = len(policy._train_microbatches(batch))
    r.gemm_shape = largest_gemm(arch, policy, batch)
    r.gemm_peak_tflops = round(gemm_peak(r.gemm_shape, gpu), 3)   # a CPU smoke's is < 0.1
    fwd = v.forward_only
    one_update(policy, batch, algos, seed=0, forward_only=fwd)       # warm-up (allocator, Triton, compile)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    r.update_runs_s = [round(one_update(policy, batch, algos, seed=1 + i, forward_only=fwd), 4) for i in range(reps)]
    r.update_s = statistics.median(r.update_runs_s)
    r.peak_mem_gib = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if gpu else None
    passes = 1.0 / 3.0 if fwd else 1.0             # forward = 2 N tokens of the update's 6 N (attention alike)
    flops = passes * step_flops(matmul_params(parts[1][0], arch), arch, work)
    r.tflops = round(flops / r.update_s / 1e12, 2)
    r.tflops_6n = round(passes * 6.0 * matmul_params(parts[1][0], arch) * work.tokens / r.update_s / 1e12, 2)
    r.pct_gemm_peak = round(100.0 * r.tflops / r.gemm_peak_tflops, 1) if r.gemm_peak_tflops else 0.0
    trace = None if trace_dir is None else trace_dir / f"uprof_{v.label.replace('/', '_')}.json.gz"
    try:                                   # a profiler failure (no CUPTI, ...) keeps the timings above
        wall, spans, r.profiler_activities = profile_update(policy, batch, algos, gpu, seed=100, trace=trace,
                                                            forward_only=fwd)
    except Exception as e:                 # noqa: BLE001
        r.profile_error = f"{type(e).__name__}: {e}"[:300]
        return r
    r.profiled_wall_s = round(wall, 4)
    r.busy_s = round(busy_us(spans) / 1e6, 4)
    r.idle_s = round(max(r.update_s - r.busy_s, 0.0), 4)
    r.idle_pct = round(100.0 * r.idle_s / r.update_s, 1)
    r.profile = breakdown(spans)
    return r


def rope_parity(parts, batch, rows: int = 8) -> dict:
    """Next-token log-probs of `rows` rows under the fused and the unfused RoPE (same weights)."""
    from megatron_rl.models.forward import gpt_forward

    model, config = parts[1][0], parts[1][0].config
    ids = torch.cat([batch["prompt_ids"][:rows], batch["response_ids"][:rows]], 1).cuda()
    mask = torch.cat([batch["prompt_mask"][:rows], batch["response_mask"][:rows].long()], 1).cuda()
    out = []
    fused = config.apply_rope_fusion
    try:
        with torch.no_grad():
            for flag in (True, False):
                config.apply_rope_fusion = flag
                logits = gpt_forward(model, ids, mask).float()
                out.append(torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0])
    finally:
        config.apply_rope_fusion = fused
    keep = mask[:, 1:].bool()
    diff = (out[0] - out[1]).abs()[keep]
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "tokens": int(keep.sum())}


def table(r: Result, peak_8192: float) -> str:
    if r.error:
        return f"## {r.label}: error\n\n{r.error}\n"
    gemm = "x".join(map(str, r.gemm_shape))
    lines = [f"## {r.label}: micro_batch_size {r.micro_batch_size}, max_tokens_per_microbatch "
             f"{r.max_tokens_per_microbatch}; {r.microbatches} micro-batches, {r.real_tokens} real tokens; "
             f"RoPE {'fused (TE)' if r.rope_fusion else 'unfused'}", "",
             f"update {r.update_s:.3f} s (median of {r.update_runs_s}); {r.tflops:.1f} TFLOP/s "
             f"({r.tflops_6n:.1f} as 6 N tokens) = "
             f"{r.pct_gemm_peak:.1f}% of the in-run GEMM peak ({gemm}: {r.gemm_peak_tflops:.0f} TFLOP/s; "
             f"8192^3: {peak_8192:.0f}); peak allocated {r.peak_mem_gib} GiB"]
    if r.profile_error:
        return "\n".join(lines + [f"profiler failed: {r.profile_error}"]) + "\n"
    lines += [f"kernels busy {r.busy_s:.3f} s, idle {r.idle_s:.3f} s ({r.idle_pct:.1f}% of the median wall); "
              f"profiled update wall {r.profiled_wall_s:.3f} s ({r.profiler_activities})", "",
              "| category | ms | % of kernel time | calls |", "|---|---:|---:|---:|"]
    lines += [f"| {c['category']} | {c['ms']:.1f} | {c['pct']:.1f} | {c['calls']} |" for c in r.profile["categories"]]
    lines += [f"| total | {r.profile['kernel_ms']:.1f} | 100.0 | |", "",
              "| top kernel | category | ms | % | calls |", "|---|---|---:|---:|---:|"]
    lines += [f"| `{k['kernel'][:90]}` | {k['category']} | {k['ms']:.2f} | {k['pct']:.1f} | {k['calls']} |"
              for k in r.profile["top"]]
    return "\n".join(lines) + "\n"


SUMMARY_CATS = ("gemm", "attention", "loss/log-softmax", "optimizer", "norm", "elementwise/activation",
                "copies/memcpy")


def summary(results: list[Result]) -> str:
    """One row per variant: time, throughput, and the main categories' % of kernel time."""
    lines = ["| variant | update s | TFLOP/s | % GEMM peak | peak GiB | " + " | ".join(f"{c} %" for c in SUMMARY_CATS)
             + " | other % | GPU idle % |", "|---|" + "---:|" * (len(SUMMARY_CATS) + 6)]
    for r in results:
        if r.error:
            lines.append(f"| {r.label} | error: {r.error[:100]} |")
            continue
        pct = {c["category"]: c["pct"] for c in r.profile.get("categories", [])}
        rest = round(100.0 - sum(pct.get(c, 0.0) for c in SUMMARY_CATS), 1)
        lines.append(f"| {r.label} | {r.update_s:.3f} | {r.tflops:.1f} | {r.pct_gemm_peak:.1f} | {r.peak_mem_gib} | "
                     + " | ".join(f"{pct.get(c, 0.0):.1f}" for c in SUMMARY_CATS) + f" | {rest} | {r.idle_pct:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="padded,packed", help="padded, packed, logprob, padded-N, packed-N, "
                    "logprob-N, each optionally +unfusedrope")
    ap.add_argument("--models", default="smollm2-1.7b", help="smollm2-1.7b (the e2e shape), llama-1b, llama-8b-8l")
    ap.add_argument("--specs", default="sdpa", help="layer specs to build, comma-separated (sdpa, te)")
    ap.add_argument("--reps", type=int, default=3, help="timed updates per variant (after one warm-up)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, CPU profiler (code paths only)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--trace-dir", type=Path, default=None, help="write each profiled update's chrome trace here")
    a = ap.parse_args(argv)
    from megatron_rl.parallel import init_distributed

    gpu = torch.cuda.is_available() and not a.cpu_smoke
    if not gpu and not a.cpu_smoke:
        raise SystemExit("profile_update.py needs CUDA; use --cpu-smoke for a CPU run of the code paths")
    variants = [parse_variant(x.strip(), a.cpu_smoke) for x in a.variants.split(",") if x.strip()]
    init_distributed()
    names = ["tiny"] if a.cpu_smoke else [x.strip() for x in a.models.split(",") if x.strip()]
    archs = {n: model_arch(n) for n in names}                       # refuse a bad name before any work
    specs = [x.strip() for x in a.specs.split(",") if x.strip()]
    rows, samples, response, prange = (16, 4, 16, (4, 7)) if a.cpu_smoke else (PROMPTS * SAMPLES, SAMPLES,
                                                                             NEW_TOKENS, (20, 24))
    reps = 1 if a.cpu_smoke else a.reps
    peak_8192 = matmul_peak(torch.device("cuda" if gpu else "cpu"))
    dev = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device {dev}; torch {torch.__version__}; {rows} rows x ({prange[0]}..{prange[1]} prompt + {response} "
          f"response) tokens; bf16 matmul 8192^3 {peak_8192:.0f} TFLOP/s\n", flush=True)
    results, rope = [], None
    for name, arch in archs.items():
        batch, work = make_batch(rows, samples, response, arch.vocab_size, prange)
        for spec in specs:
            parts = build_model(arch, gpu, spec)
            n_params = sum(p.numel() for p in parts[1][0].parameters()) / 1e9
            print(f"# {name} ({n_params:.3f}B parameters), {spec} spec\n", flush=True)
            if rope is None and parts[1][0].config.apply_rope_fusion:
                rope = rope_parity(parts, batch)
                print(f"fused vs unfused RoPE, same weights and rows: log-prob max abs diff {rope['max_abs']:.3e}, "
                      f"mean {rope['mean_abs']:.3e} (bf16 forward, {rope['tokens']} tokens)\n", flush=True)
            for v in variants:
                v = dataclasses.replace(v, label=f"{name}/{spec}/{v.label}")
                try:
                    r = run_variant(parts, v, batch, work, reps, gpu, a.trace_dir)
                except Exception as e:         # noqa: BLE001 - one failing variant must not lose the others
                    r = Result(v.label, v.micro_batch_size, v.max_tokens_per_microbatch,
                               error=f"{type(e).__name__}: {e}"[:500])
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
                results.append(r)
                print(table(r, peak_8192), flush=True)
            del parts
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    print(summary(results), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"device": dev, "torch": torch.__version__, "matmul_8192_tflops": peak_8192,
                                      "rope_parity": rope,
                                      "variants": [asdict(r) for r in results]}, indent=1))
    return results


if __name__ == "__main__":
    main()
