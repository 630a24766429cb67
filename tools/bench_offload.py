"""GPU measurement of offload/onload (models/offload.py) on a ~1B Llama-shaped random model (bf16).

Sections, one table:
- ref: reference log-probs of a batch with and without `ref.offload`: memory allocated
  between uses, peak during the pass, onload/offload time and GB/s, max |log-prob diff|;
- actor: the trainable state (fp32 grads, optimizer state, then weights) offloaded after an
  update: allocated before/after, time and GB/s; the next update after the round trip vs
  one without it (max |param diff|, expected 0);
- seq: peak memory of "actor update -> reference log-probs" with everything resident vs
  `ref.offload` + the actor's grads/optimizer offloaded before the reference pass.

    python tools/bench_offload.py                # CUDA only; writes the HF dir to /tmp once
    python tools/bench_offload.py --layers 4     # quicker, smaller
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9
ROWS: list[tuple[str, str, str, str]] = []


def row(section: str, metric: str, plain, offload) -> None:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)       # noqa: E731
    ROWS.append((section, metric, fmt(plain), fmt(offload)))
    print(f"| {section} | {metric} | {fmt(plain)} | {fmt(offload)} |", flush=True)


def alloc_gb() -> float:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / GB


def peak_gb() -> float:
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GB


def free_all() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def write_hf(out: Path, layers: int, vocab: int) -> Path:
    """A random Llama (llama-1b preset shape: 16 x 2048, GQA 32/8, ffn 8192, tied) in bf16."""
    import transformers

    if (out / "config.json").exists():
        return out
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=vocab,
                                   max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                   rope_theta=500000.0, torch_dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    free_all()
    return out


def make_batch(n: int, prompt: int, response: int, vocab: int, seed: int):
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    resp_mask = torch.ones(n, response)
    for i in range(n):                               # ragged responses, at least half long
        resp_mask[i, response // 2 + int(torch.randint(0, response // 2 + 1, (1,), generator=g)):] = 0
    return Batch({"prompt_ids": torch.randint(0, vocab, (n, prompt), generator=g),
                  "prompt_mask": torch.ones(n, prompt, dtype=torch.long),
                  "response_ids": torch.randint(0, vocab, (n, response), generator=g) * resp_mask.long(),
                  "response_mask": resp_mask,
                  "advantages": torch.randn(n, response, generator=g) * resp_mask,
                  "old_logprob": (-torch.rand(n, response, generator=g) * 3 - 9) * resp_mask},
                 [{"uid": str(i), "group": i // 4} for i in range(n)])


def rss_gb() -> float:
    """This process's resident host memory (pinned host buffers included once touched)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024 / GB


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def sec_reference(cfg, plan, batch):
    """Plain vs offloaded reference; returns (plain ref, offloaded ref) for the sequence section."""
    from megatron_rl.trainer.build import build_frozen_policy

    free_all()
    base = alloc_gb()
    plain = build_frozen_policy(cfg, plan, offload=False)
    resident = alloc_gb() - base
    torch.cuda.reset_peak_memory_stats()
    expect, t_plain = timed(lambda: plain.compute_logprobs(batch)[0])
    peak_plain = peak_gb() - base
    plain.offload()                                        # no offloader: a no-op
    free_all()

    base2 = alloc_gb()
    ref = build_frozen_policy(cfg, plan, offload=True)           # offloaded at build (pins host buffers)
    between = alloc_gb() - base2
    off = ref.offloader
    times, diffs = [], []
    for _ in range(2):                                     # second pass: host buffers already pinned
        torch.cuda.reset_peak_memory_stats()
        on_stats = off.onload()
        lp, t_lp = timed(lambda: ref.compute_logprobs(batch)[0])
        off_stats = off.offload()
        times.append((on_stats, off_stats, t_lp))
        diffs.append((lp - expect).abs().max().item())
    peak_off = peak_gb() - base2
    on_stats, off_stats, t_lp = times[-1]
    row("ref", "weights (GB)", resident, on_stats.bytes_copied / GB)
    row("ref", "allocated between uses (GB)", resident, between)
    row("ref", "peak during log-probs (GB)", peak_plain, peak_off)
    row("ref", "log-prob pass (s)", t_plain, t_lp)
    row("ref", "onload s / GB/s", "-", f"{on_stats.seconds:.3f} / {on_stats.gb_per_s:.1f}")
    row("ref", "offload s / GB/s", "-", f"{off_stats.seconds:.3f} / {off_stats.gb_per_s:.1f}")
    row("ref", "max |log-prob diff| (2 passes)", 0.0, max(diffs))
    return plain, ref, expect


def sec_actor_and_sequence(cfg, plan, refs: dict, batches):
    """Actor A (nothing offloaded, `refs["plain"]` resident) and actor B (training state
    offloaded between its updates, `refs["offload"]` offloaded), each: update -> reference
    log-probs -> update. The plain reference is dropped before B, so that memory is B's alone."""
    from megatron_rl.trainer.build import build_actor
    from megatron_rl.models.offload import TrainingStateOffloader
    from megatron_rl.algos.config import AlgosConfig

    algos = AlgosConfig()
    upd = lambda pol, b: pol.update(b, algos, mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)  # noqa: E731
    results = {}
    for mode in ("plain", "offload"):
        ref = refs[mode]
        if mode == "offload":
            refs.pop("plain")
        free_all()
        base = alloc_gb() - (ref.offloader is None) * sum(p.numel() * p.element_size()
                                                          for p in ref.model.parameters()) / GB
        actor = build_actor(cfg, plan)
        if mode == "offload":
            actor.offloader = TrainingStateOffloader(actor.ddp, actor.optimizer)
        torch.cuda.reset_peak_memory_stats()
        m1 = upd(actor, batches[0])
        after_update = alloc_gb() - base
        if mode == "offload":
            rss0 = rss_gb()
            s_grad_opt = actor.offloader.offload()
            after_grad_opt = alloc_gb() - base
        with ref.onloaded():
            ref.compute_logprobs(batches[0])
        seq_peak = peak_gb() - base
        if mode == "offload":
            s_w = actor.offloader.offload(weights=True)
            after_all = alloc_gb() - base
            rss_growth = rss_gb() - rss0
            s_on = actor.offloader.onload()
            restored = alloc_gb() - base
            s_warm_off = actor.offloader.offload(weights=True)      # host buffers pinned already
            s_warm_on = actor.offloader.onload()
        m2 = upd(actor, batches[1])
        params = [p.detach().float().cpu() for p in actor.model.parameters()]
        results[mode] = dict(after_update=after_update, seq_peak=seq_peak, params=params, m=(m1, m2))
        if mode == "offload":
            results[mode].update(after_grad_opt=after_grad_opt, after_all=after_all, restored=restored,
                                 s_grad_opt=s_grad_opt, s_w=s_w, s_on=s_on, s_warm_off=s_warm_off,
                                 s_warm_on=s_warm_on, rss_growth=rss_growth)
        del actor
    a, b = results["plain"], results["offload"]
    row("actor", "allocated after update (GB)", a["after_update"], b["after_update"])
    row("actor", "after offload grads+optimizer (GB)", "-", b["after_grad_opt"])
    row("actor", "after offload weights too (GB)", "-", b["after_all"])
    row("actor", "after onload (GB)", "-", b["restored"])
    so = b["s_grad_opt"]
    row("actor", "grads freed + optimizer copied (GB)", "-",
        f"{(so.bytes_freed - so.bytes_copied) / GB:.3f} + {so.bytes_copied / GB:.3f}")
    st = lambda m: f"{m.seconds:.3f} / {m.gb_per_s:.1f}"                                          # noqa: E731
    row("actor", "1st offload grads+opt s / GB/s (pins host)", "-", st(so))
    row("actor", "1st offload weights s / GB/s (pins host)", "-", st(b["s_w"]))
    row("actor", "onload all s / GB/s", "-", st(b["s_on"]))
    row("actor", "host RSS growth / bytes held (GB)", "-",
        f"{b['rss_growth']:.2f} / {(so.bytes_copied + b['s_w'].bytes_copied) / GB:.2f}")
    row("actor", "2nd offload all s / GB/s", "-", st(b["s_warm_off"]))
    row("actor", "2nd onload all s / GB/s", "-", st(b["s_warm_on"]))
    diff = max((x - y).abs().max().item() for x, y in zip(a["params"], b["params"]))
    row("actor", "max |param diff| after next update", 0.0, diff)
    row("actor", "update metrics equal", True, a["m"] == b["m"])
    row("seq", "peak update -> ref log-probs (GB)", a["seq_peak"], b["seq_peak"])
    return diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-dir", default="/tmp/llama-1b-offload")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=768)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--layer-spec", default="local", help="local: deterministic kernels for the bit-identity check")
    ap.add_argument("--fused-loss", default="off", help="actor.fused_loss (off: torch loss, deterministic)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_offload: needs a CUDA GPU")
        return 2
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from megatron_rl.config import load_experiment_config
    from megatron_rl.parallel import init_distributed

    t0 = time.time()
    init_distributed()
    torch.use_deterministic_algorithms(True, warn_only=True)
    hf = write_hf(Path(args.hf_dir) if args.layers == 16 else Path(f"{args.hf_dir}-{args.layers}l"),
                  args.layers, args.vocab)
    print(f"model dir {hf} ready after {time.time() - t0:.0f}s", flush=True)
    cfg = load_experiment_config(None, [f"model.path={hf}", f"model.layer_spec={args.layer_spec}",
                                        "model.dtype=bfloat16", f"actor.micro_batch_size={args.micro_batch}",
                                        f"actor.fused_loss={args.fused_loss}", "actor.optim.lr=1e-5",
                                        "ref.offload=true"])
    from megatron_rl.plan import resolve_plan
    plan = resolve_plan(cfg, world_size=1, device="cuda")
    batches = [make_batch(args.batch, args.prompt, args.response, args.vocab, s) for s in (0, 1)]
    print("| section | metric | no offload | offload |\n|---|---|---|---|", flush=True)
    plain, ref, _ = sec_reference(cfg, plan, batches[0])
    refs = {"plain": plain, "offload": ref}
    del plain, ref
    diff = sec_actor_and_sequence(cfg, plan, refs, batches)
    print(f"bench_offload done in {time.time() - t0:.0f}s; next-update param diff {diff:.3g} "
          f"({'bit-identical' if diff == 0 else 'DIFFERS'})", flush=True)
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
