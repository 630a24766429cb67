"""One GPU call that checks and times the vLLM rollout path (issue #10) on an H100.

Sections (each in try/except: a failure prints its traceback and the rest still run):
  1. logprobs  Megatron actor + vLLM engine (one in-process `LLM`, reused throughout):
               sync the (perturbed) actor's weights, sample with vLLM, compare vLLM's
               log-probs of the sampled tokens with the actor's (mean / max abs diff),
               before and after the sync.
  2. sync      weight-sync time and GB/s (SmolLM2-135M shape; ~1B Llama shape at the end)
               against the device-to-device copy bandwidth measured in the same run.
  3. tokens/s  vLLM generation vs the native Megatron engine on the same prompts.
  4. steering  one-layer additive SAE steering inside vLLM: overhead with vs without the
               hook, fraction of greedy tokens it changes, and steered vLLM log-probs vs the
               steered Megatron actor (same intervention, residual stream = hidden + residual).
  5. grpo      one GRPO step through the real Trainer with `rollout.engine=vllm`
               (colocated: vLLM sleeps during training, wakes for the weight sync).
  6. graph     (own process: --sections graph) torch.compile + CUDA graphs (enforce_eager=False): tokens/s of the plain model
               vs the steered architecture (steering/vllm_graph.py), and the same checks as 4.
Random weights (no hub): the SmolLM2 config/tokenizer from --model-config.
Prints a markdown table; writes $OUT/vllm_results.md and $OUT/vllm_results.json if $OUT is set.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=/tmp/vsite:$PYTHONPATH \
        python tools/gpu_vllm.py --model-config .cache/demo/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROWS: list[tuple[str, str, str]] = []
T0 = time.time()


def row(section: str, metric: str, value) -> None:
    v = f"{value:.4g}" if isinstance(value, float) else str(value)
    ROWS.append((section, metric, v))
    print(f"[{time.time() - T0:6.1f}s] {section:9s} {metric}: {v}", flush=True)


def section(name: str, fn, *args):
    print(f"\n=== {name} ({time.time() - T0:.0f}s)", flush=True)
    try:
        return fn(*args)
    except Exception:
        traceback.print_exc()
        row(name, "error", traceback.format_exc().strip().splitlines()[-1][:120])
        return None


def sync_cuda():
    torch.cuda.synchronize()


# --- set-up ---------------------------------------------------------------------------------

def make_llm(model_dir: Path, util: float, sleep_mode: bool = True, **extra):
    """A vLLM `LLM` in this process; optional keywords are dropped if this vLLM lacks them.
    Sleep mode's CuMem allocator serves one LLM per process, so a second one needs sleep_mode=False."""
    import vllm

    kw = dict(model=str(model_dir), dtype="bfloat16", enforce_eager=True, enable_sleep_mode=sleep_mode,
              gpu_memory_utilization=util, max_model_len=1024, seed=0, enable_prefix_caching=True)
    kw.update(extra)
    optional = dict(logprobs_mode="processed_logprobs", generation_config="vllm")
    try:
        return vllm.LLM(**kw, **optional)
    except TypeError as e:   # an older/newer vLLM without one of the optional keywords
        print(f"vllm.LLM rejected {list(optional)} ({e}); retrying without them", flush=True)
        return vllm.LLM(**kw)


def prompts_batch(tok, n: int):
    from megatron_rl.data.batch import Batch

    texts = [f"Question {i}: what is {i % 7} plus {i % 5}? Explain step by step." for i in range(n)]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return Batch({"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"]},
                 [{"uid": str(i)} for i in range(n)])


def masked_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    d = (a.float() - b.float()).abs() * mask
    return (d.sum() / mask.sum().clamp(min=1)).item(), d.max().item()


def d2d_bandwidth(gib: float = 1.0) -> float:
    x = torch.empty(int(gib * 2 ** 30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    sync_cuda()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync_cuda()
    bw = 5 * x.numel() / (time.perf_counter() - t) / 1e9
    del x, y
    torch.cuda.empty_cache()
    return bw


# --- sections -------------------------------------------------------------------------------

def sec_logprobs(ctx):
    from megatron_rl.rollout.protocol import SamplingParams

    actor, policy, engine = ctx.actor, ctx.policy, ctx.engine
    batch = prompts_batch(ctx.tok, 64)
    sp = SamplingParams(temperature=1.0, n=2, max_new_tokens=64, seed=0)
    with torch.no_grad():
        for p in actor.parameters():          # the actor now differs from the weights vLLM loaded
            p.mul_(1.02)
    out = engine.generate(batch, sp)
    lp, _ = policy.compute_logprobs(out)
    m, x = masked_diff(lp, out["rollout_logprob"], out["response_mask"])
    row("logprobs", "before sync: mean / max abs diff", f"{m:.4f} / {x:.4f}")
    metrics = engine.sync_weights(policy)        # the Trainer passes its Policy (has .model)
    row("logprobs", "sync bytes (GB)", metrics["weight_sync/bytes"] / 1e9)
    out = engine.generate(batch, sp)
    lp, _ = policy.compute_logprobs(out)
    m, x = masked_diff(lp, out["rollout_logprob"], out["response_mask"])
    row("logprobs", "after sync: mean / max abs diff (bf16)", f"{m:.4f} / {x:.4f}")
    row("logprobs", "tokens compared", int(out["response_mask"].sum().item()))


def sec_sync(ctx, label: str, engine, actor, reps: int = 3):
    from megatron_rl.models.loading import iter_hf_weights

    for mb in (256, 64):
        engine.bucket_mb = mb
        times, res = [], None
        for _ in range(reps):
            sync_cuda()
            t = time.perf_counter()
            res = engine.update_weights(iter_hf_weights(actor))
            sync_cuda()
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        gb = res["weight_sync/bytes"] / 1e9
        row("sync", f"{label} bucket {mb} MB: {gb:.3f} GB in s (median of {reps})", sec)
        row("sync", f"{label} bucket {mb} MB: GB/s (end to end: gather+bucket+load)", gb / sec)
    engine.bucket_mb = 256
    row("sync", f"{label}: device-to-device copy GB/s (same run)", ctx.d2d)


def timed_generate(engine, batch, sp) -> tuple[float, float]:
    sync_cuda()
    t = time.perf_counter()
    out = engine.generate(batch, sp)
    sync_cuda()
    dt = time.perf_counter() - t
    return float(out["response_mask"].sum().item()), dt


def sec_tokens(ctx):
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams

    batch = prompts_batch(ctx.tok, 256)
    sp = SamplingParams(temperature=1.0, max_new_tokens=128, seed=1)
    timed_generate(ctx.fast, batch.select(range(min(16, len(batch)))), sp)          # warm-up
    toks, dt = timed_generate(ctx.fast, batch, sp)
    row("tokens/s", "vLLM 256 x 128 (eager, bf16)", toks / dt)
    ctx.eager_tps = toks / dt
    native = NativeEngine(ctx.actor, ctx.tok, max_batch_size=256)
    timed_generate(native, batch.select(range(min(16, len(batch)))), SamplingParams(max_new_tokens=8))
    toks_n, dt_n = timed_generate(native, batch, sp)
    row("tokens/s", "native Megatron engine, same prompts", toks_n / dt_n)
    row("tokens/s", "vLLM / native", (toks / dt) / (toks_n / dt_n))


def random_sae(d_in: int, layer: int):
    from megatron_rl.steering.sae import SAE

    g = torch.Generator().manual_seed(0)
    d_sae = 8 * d_in
    return SAE({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "hook_name": f"blocks.{layer}.hook_resid_post"},
               {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.05, "b_enc": torch.zeros(d_sae),
                "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.05, "b_dec": torch.zeros(d_in)})


def interleaved_tps(engines: dict, batch, sp, reps: int = 5) -> dict[str, tuple[float, float, float]]:
    """Tokens/s per named (engine, steering on/off/None) variant as (median, min, max). Runs
    are interleaved and the order flips every repetition (ABBA...), so drift and order
    effects hit every variant alike; min-max shows the noise."""
    tps = {name: [] for name in engines}
    names = list(engines)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            engine, steer_on = engines[name]
            if steer_on is not None:
                engine.set_steering_enabled(steer_on)
            toks, dt = timed_generate(engine, batch, sp)
            tps[name].append(toks / dt)
    return {name: (statistics.median(v), min(v), max(v)) for name, v in tps.items()}


def tps_row(label: str, tps: dict, base: str, steered: str) -> None:
    """One row per variant (median [min-max]) and the overhead of `steered` over `base`."""
    for name, (med, lo, hi) in tps.items():
        row(label, f"tokens/s {name}: median [min-max] of interleaved runs",
            f"{med:.0f} [{lo:.0f}-{hi:.0f}]")
    row(label, f"overhead % ({base} -> {steered}, medians; goal <= 3)", 100 * (tps[base][0] / tps[steered][0] - 1))


def steered_megatron_diff(ctx, iv, layer: int, out) -> tuple[float, float]:
    """Mean / max |vLLM - Megatron| log-probs of `out`'s tokens, the actor steered by the same
    intervention (per-sample strengths from `out["steer_strengths"]` when present)."""
    from megatron_rl.steering.controller import SteeringController

    ctl = SteeringController(iv, layer, scope="all")
    ctl.attach(ctx.actor)
    ctx.policy.steering = ctl
    try:
        lp, _ = ctx.policy.compute_logprobs(out)
    finally:
        ctx.policy.steering = None
        ctl.detach()
    return masked_diff(lp, out["rollout_logprob"], out["response_mask"])


def steering_checks(label: str, engine, ctx, iv, layer: int) -> None:
    """Greedy tokens changed by steering; steered vLLM log-probs vs the steered Megatron actor."""
    from megatron_rl.rollout.protocol import SamplingParams

    small = prompts_batch(ctx.tok, 32)
    greedy = SamplingParams(greedy=True, max_new_tokens=32)
    engine.set_steering_enabled(False)
    plain = engine.generate(small, greedy)
    engine.set_steering_enabled(True)
    steered = engine.generate(small, greedy)
    w = min(plain["response_ids"].shape[1], steered["response_ids"].shape[1])
    changed = (plain["response_ids"][:, :w] != steered["response_ids"][:, :w]).float().mean().item()
    row(label, "fraction of greedy tokens changed by steering", changed)
    out = engine.generate(small, SamplingParams(temperature=1.0, max_new_tokens=32, seed=3))
    m, x = steered_megatron_diff(ctx, iv, layer, out)
    row(label, "steered vLLM vs steered Megatron log-probs: mean / max", f"{m:.4f} / {x:.4f}")


def per_request_checks(label: str, engine, ctx, iv, layer: int) -> None:
    """64 prompts with 16 distinct strength rows: one vLLM call (per-request rows) vs one call
    per row; steered log-probs vs Megatron steered per sample."""
    from megatron_rl.rollout.protocol import SamplingParams

    row(label, "per-request steering rows active on every worker", engine.per_request)
    batch = prompts_batch(ctx.tok, 64)
    batch["steer_strengths"] = torch.linspace(-8.0, 8.0, 16).repeat(4)[:, None]
    sp = SamplingParams(temperature=1.0, max_new_tokens=64, seed=4)
    engine.set_steering_enabled(True)
    timed_generate(engine, batch, sp)                               # warm-up
    _, dt_one = timed_generate(engine, batch, sp)
    calls = engine.last_metrics.get("rollout/vllm_steering_calls")
    saved, engine.per_request = engine.per_request, False
    _, dt_groups = timed_generate(engine, batch, sp)
    engine.per_request = saved
    row(label, "64 prompts x 16 strength rows: s in one call / in one call per row",
        f"{dt_one:.2f} ({calls:.0f} call) / {dt_groups:.2f} ({engine.last_metrics.get('rollout/vllm_steering_calls'):.0f} calls)")
    out = engine.generate(batch, sp)
    m, x = steered_megatron_diff(ctx, iv, layer, out)
    row(label, "per-request rows: vLLM vs Megatron steered per sample, log-probs mean / max", f"{m:.4f} / {x:.4f}")


def one_layer_add(ctx):
    from megatron_rl.steering.interventions import build_intervention

    layer = ctx.actor.config.num_layers // 2
    sae = random_sae(ctx.actor.config.hidden_size, layer).cuda()
    return build_intervention("add", sae, feature_idxs=[7], max_activations=[2.0], strengths=[8.0]), layer


def sec_steering(ctx):
    from megatron_rl.rollout.protocol import SamplingParams

    iv, layer = one_layer_add(ctx)
    ctx.fast.attach_intervention(iv, layer, "all")
    tps = interleaved_tps({"eager, hook off": (ctx.fast, False), "eager, one-layer add": (ctx.fast, True)},
                          prompts_batch(ctx.tok, 256), SamplingParams(temperature=1.0, max_new_tokens=128, seed=2))
    tps_row("steering", tps, "eager, hook off", "eager, one-layer add")
    steering_checks("steering", ctx.fast, ctx, iv, layer)
    ctx.fast.detach_steering()


def sleep_small_llm(ctx) -> None:
    """Give the 135M engine's memory back before another LLM starts in this process."""
    if not getattr(ctx, "small_asleep", False):
        grpo = getattr(ctx, "grpo_engine", None)
        if grpo is None or grpo.state != "asleep":
            ctx.llm.sleep(level=1)
        ctx.small_asleep = True


def sec_graph(ctx):
    """CUDA graphs + torch.compile (enforce_eager=False): the steered architecture first
    (checks, steering on/off), then the plain model for the overhead."""
    from megatron_rl.rollout.protocol import SamplingParams
    from megatron_rl.rollout.vllm_config import VLLMConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.steering.vllm_graph import graph_overrides, register_steered_arch

    sleep_small_llm(ctx)
    iv, layer = one_layer_add(ctx)
    vcfg = VLLMConfig(sleep_level=0, enforce_eager=False)
    common = dict(sleep_mode=False, enforce_eager=False, enable_prefix_caching=False)   # no cache: equal prefill
    register_steered_arch()
    t = time.time()
    steered = VLLMEngine(make_llm(ctx.model_dir, 0.15, hf_overrides=graph_overrides(ctx.model_dir, layer), **common),
                         ctx.tok, vcfg, colocate=False, dtype=torch.bfloat16)
    row("graph", "steered LLM() start with torch.compile + CUDA graphs, s", time.time() - t)
    steered.sync_weights(ctx.policy)
    steered.attach_intervention(iv, layer, "all")
    steering_checks("graph", steered, ctx, iv, layer)
    per_request_checks("graph", steered, ctx, iv, layer)
    sp = SamplingParams(temperature=1.0, max_new_tokens=128, seed=2)
    batch = prompts_batch(ctx.tok, 256)
    timed_generate(steered, batch.select(range(16)), sp)            # warm-up
    plain = VLLMEngine(make_llm(ctx.model_dir, 0.15, **common), ctx.tok, vcfg, colocate=False, dtype=torch.bfloat16)
    plain.sync_weights(ctx.policy)
    timed_generate(plain, batch.select(range(16)), sp)
    tps = interleaved_tps({"graphs, plain model": (plain, None), "graphs, one-layer add": (steered, True),
                           "graphs, steered model with zero delta": (steered, False)}, batch, sp)
    tps_row("graph", tps, "graphs, plain model", "graphs, one-layer add")


def sec_grpo(ctx):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.rollout import vllm_engine
    from megatron_rl.trainer import main as train_main_mod

    data = Path("/tmp/vllm_qs_data")
    subprocess.run([sys.executable, "tools/make_quickstart_data.py", "--out", str(data), "--n-train", "64",
                    "--n-val", "32"], check=True)
    run_dir = Path("/tmp/vllm_grpo_run")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"model.path={ctx.model_dir}", "model.dtype=bfloat16", "model.layer_spec=sdpa", "rollout.engine=vllm",
                 f"data.train_files=[{data / 'train.jsonl'}]", f"data.val_files=[{data / 'val.jsonl'}]",
                 "data.train_batch_size=32", "data.val_batch_size=32", "rollout.n=8", "rollout.max_new_tokens=64",
                 "actor.micro_batch_size=64", "reward.num_workers=0", "trainer.total_steps=1",
                 "trainer.val_before_train=false", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]"]
    cfg = load_experiment_config("configs/quickstart_cpu.yaml", overrides)
    engine = vllm_engine.VLLMEngine(ctx.llm, ctx.tok, ctx.vcfg_colocated, colocate=True, bucket_mb=256,
                                    dtype=torch.bfloat16)
    original = vllm_engine.VLLMEngine.from_config
    vllm_engine.VLLMEngine.from_config = classmethod(lambda cls, c, t: engine)   # reuse the one LLM
    try:
        trainer = train_main_mod.build_trainer(cfg)
    finally:
        vllm_engine.VLLMEngine.from_config = original
    ctx.grpo_engine = engine
    engine.sync_weights(trainer.actor)         # the trainer's fresh actor, not the sections' one
    t = time.perf_counter()
    trainer.fit()
    trainer.logger.close()
    row("grpo", "1 step + validation, s", time.perf_counter() - t)
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    m = {k: v for ln in lines if ln.get("step") == 1 for k, v in ln.items()}
    for k in ("timing/step", "timing/rollout", "timing/update", "timing/weight_sync", "weight_sync/gbps",
              "rollout/logprob_diff", "rollout/logprob_diff_max", "reward/mean", "val/reward"):
        if k in m:
            row("grpo", k, float(m[k]))
    free, total = torch.cuda.mem_get_info()
    row("grpo", "GPU memory free after the step (vLLM asleep), GB", free / 1e9)


def llama_1b_config_dir(out: Path, tokenizer_dir: Path) -> Path:
    """A ~1B Llama config (no weights: vLLM starts with load_format=dummy) + SmolLM2's tokenizer."""
    import transformers

    if not (out / "config.json").exists():
        cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=49152,
                                       max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / f).exists() and not (out / f).exists():
            shutil.copy2(tokenizer_dir / f, out / f)
    return out


def sec_sync_1b(ctx, budget_s: float):
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.models.provider import build_model
    from megatron_rl.rollout.vllm_config import VLLMConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    if time.time() - T0 > budget_s:
        row("sync", "~1B", f"skipped: {time.time() - T0:.0f}s spent, budget {budget_s:.0f}s")
        return
    big = llama_1b_config_dir(Path("/tmp/llama-1b-random"), ctx.model_dir)
    sleep_small_llm(ctx)
    actor = build_model(arch_from_hf_config(big), dtype="bfloat16", layer_spec="sdpa").cuda()
    n = sum(p.numel() for p in actor.parameters())
    row("sync", "~1B actor parameters (B)", n / 1e9)
    llm = make_llm(big, 0.3, sleep_mode=False, load_format="dummy")
    engine = VLLMEngine(llm, ctx.tok, VLLMConfig(sleep_level=0), colocate=False, bucket_mb=256, dtype=torch.bfloat16)
    sec_sync(ctx, "~1B", engine, actor)


# --- main -----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-config", required=True, help="directory with SmolLM2's config.json and tokenizer")
    ap.add_argument("--sections", default="logprobs,sync,tokens,steering,grpo,sync1b",
                    help="comma-separated subset of logprobs,sync,tokens,steering,grpo,sync1b,graph")
    ap.add_argument("--budget-s", type=float, default=400, help="skip the ~1B sync section after this many seconds")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # the model lives in this process
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # callables through apply_model if not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    want = set(args.sections.split(","))

    import transformers

    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.vllm_config import VLLMConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.trainer.policy import Policy
    from tools.gpu_validate import make_random_model

    ctx = types.SimpleNamespace()
    ctx.model_dir = make_random_model(Path(args.model_config), Path("/tmp/smollm2-random"))
    init_distributed()
    ctx.tok = transformers.AutoTokenizer.from_pretrained(ctx.model_dir)
    ctx.actor = load_checkpoint(ctx.model_dir, dtype="bfloat16", layer_spec="sdpa")
    ctx.policy = Policy(ctx.actor, micro_batch_size=64)
    ctx.d2d = d2d_bandwidth()
    row("setup", "device-to-device copy GB/s", ctx.d2d)
    if want - {"graph"}:       # graph alone starts its own LLMs (a crash there must not take the others)
        t = time.time()
        ctx.llm = make_llm(ctx.model_dir, 0.35)
        row("setup", "vLLM LLM() start, s", time.time() - t)
        ctx.vcfg_colocated = VLLMConfig(sleep_level=1)
        ctx.engine = VLLMEngine(ctx.llm, ctx.tok, ctx.vcfg_colocated, colocate=True, dtype=torch.bfloat16)
        ctx.fast = VLLMEngine(ctx.llm, ctx.tok, VLLMConfig(sleep_level=0), colocate=False, dtype=torch.bfloat16)
    else:
        ctx.small_asleep = True
    if "logprobs" in want:
        section("logprobs", sec_logprobs, ctx)
    if "sync" in want:
        ctx.engine.wake()
        section("sync", sec_sync, ctx, "SmolLM2-135M", ctx.fast, ctx.actor)
    if "tokens" in want:
        ctx.engine.wake()
        section("tokens/s", sec_tokens, ctx)
    if "steering" in want:
        ctx.engine.wake()
        section("steering", sec_steering, ctx)
    if "grpo" in want:
        section("grpo", sec_grpo, ctx)
    if "sync1b" in want:
        section("sync", sec_sync_1b, ctx, args.budget_s)
    if "graph" in want:
        section("graph", sec_graph, ctx)
    table = "| section | metric | value |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in ROWS)
    print("\n" + table + f"\n\ntotal {time.time() - T0:.0f}s", flush=True)
    out = os.environ.get("OUT")
    if out:
        tag = "" if args.sections == ap.get_default("sections") else "_" + args.sections.replace(",", "_")
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"vllm_results{tag}.md").write_text(table + "\n")
        Path(out, f"vllm_results{tag}.json").write_text(json.dumps(ROWS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
