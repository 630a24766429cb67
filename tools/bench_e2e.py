"""End-to-end GRPO step on one GPU: megatron-rl against TRL's `GRPOTrainer` (vLLM colocate) on
the same workload, and vLLM alone on the same generation (the ceiling for the rollout phase).

Workload (issue #20): a random SmolLM2-1.7B-shaped Llama (bf16), 64 prompts x 8 samples x 256
new tokens (fixed length: `ignore_eos`), GRPO with PPO-clip, one optimizer step per rollout, no
KL, the same reward (fraction of vowels among the response's letters), vLLM 0.26 with CUDA
graphs and the same `gpu_memory_utilization` in both frameworks.

    python3 tools/bench_e2e.py all --dir /tmp/e2e --tokenizer DIR       # every part, then the table
    python3 tools/bench_e2e.py prepare|vllm|mrl|trl|table --dir /tmp/e2e  # one part (each in its own process)
    python3 tools/bench_e2e.py mrl --dir /tmp/e2e --variant 'none:actor.offload_during_rollout=none' \
        --variant 'engine-seed:actor.offload_during_rollout=none,rollout.vllm.per_request_seed=false'

Each part writes `DIR/<part>.json` (`mrl`: `mrl_<label>.json`; each `--variant LABEL:k=v,k=v` runs
in its own process, one after another, on top of the `--override`s); `table` prints them. Step
times are the median of steps 2..N (step 1 carries CUDA-graph capture and allocator warm-up);
peak memory is the device's (total - free, sampled every 20 ms), which counts vLLM's pool and
the trainer's alike. Needs CUDA, vLLM 0.26 and, for `trl`, TRL 1.16 + datasets (docs/gpu_staging.md).

Seeding: vLLM alone is timed both ways: `request_seed` (SamplingParams.seed per prompt, what
`rollout.vllm.per_request_seed=true`, the default, sends) and `engine_seed` (no request seed:
vLLM's engine generator, `per_request_seed=false`); `same_tokens` says whether the reps drew the
same tokens. Measured 2026-12-01 on one H200 (`bash tools/gpu_session.sh e2e`): request seeds
4.77 s vs engine seed 4.89 s without log-probs, 9.11 s vs 10.11 s with `logprobs=0`; the Python
loop vLLM 0.26's sampler runs over seeded sequences stays hidden here, and only request seeds
repeat (an earlier version re-seeded the device generator around each engine-seeded rep:
`same_tokens` was still false, so that re-seeding is gone). TRL 1.16
(trl/generation/vllm_generation.py, colocate) passes no SamplingParams.seed:
`vllm.LLM(seed=process_index // tp)`, n=1 per request with each prompt repeated num_generations
times, max_num_batched_tokens=4096. An mrl row's "vs vLLM alone" uses
the vLLM row of its own seeding and log-prob setting (both recorded in its json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_1_7B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=49152, max_position_embeddings=2048, rope_theta=130000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
PROMPTS, SAMPLES, NEW_TOKENS = 64, 8, 256
SEEDINGS = ("engine_seed", "request_seed")


def vowel_reward(response: str, sample: dict | None = None) -> float:
    """The benchmark's reward, identical in both frameworks: a cheap rule with variance
    (counted in C: the per-character generator took 72 ms for 512 random-token responses)."""
    text = response.lower()
    letters = sum(map(str.isalpha, text))
    return sum(map(text.count, "aeiou")) / letters if letters else 0.0


class PeakMemory:
    """Device-level peak (total - free) sampled in a thread: includes vLLM's own pool."""

    def __init__(self, every_s: float = 0.02):
        import torch

        self.torch, self.every_s, self.peak, self._stop = torch, every_s, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.every_s)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def peak_gib(self) -> float:
        return self.peak / 2 ** 30


def kv_cache_tokens(llm) -> int | None:
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        return int(cc.num_gpu_blocks * cc.block_size)
    except Exception:          # the attribute path is vLLM-internal; report nothing rather than fail
        return None


def prompts() -> list[str]:
    return [f"Question {i}: write a few sentences about the number {i} and what it means to you." for i in range(PROMPTS)]


def write(d: Path, part: str, result: dict) -> None:
    (d / f"{part}.json").write_text(json.dumps(result, indent=1))
    print(f"{part}: {json.dumps(result)}", flush=True)


# --- parts ------------------------------------------------------------------------------------------
def prepare(d: Path, tokenizer: Path) -> None:
    import shutil

    import torch
    import transformers

    from megatron_rl.data.writers import write_jsonl

    model = d / "model"
    if not (model / "config.json").exists():
        cfg = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2,
                                       pad_token_id=2, **SMOLLM2_1_7B)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        m.save_pretrained(model)
        for f in tokenizer.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy(f, model / f.name)
    rows = [{"prompt": p, "ground_truth": ""} for p in prompts()]
    write_jsonl(d / "train.jsonl", rows * 8)
    write_jsonl(d / "val.jsonl", rows[:8])
    print(f"prepared {model}")


def vllm_row(seeding: str, logprobs: bool) -> str:
    return f"{seeding}_{'logprobs' if logprobs else 'no_logprobs'}"


def vllm_params(vllm, seeding: str, logprobs: bool) -> list:
    """One SamplingParams per prompt; `request_seed` seeds them as `vllm_convert.request_seeds` does."""
    from megatron_rl.rollout.protocol import SamplingParams
    from megatron_rl.rollout.vllm_convert import request_seeds

    extra = {"logprobs": 0} if logprobs else {}
    seeds = request_seeds(SamplingParams(n=SAMPLES, seed=0), PROMPTS) if seeding == "request_seed" else [None] * PROMPTS
    return [vllm.SamplingParams(n=SAMPLES, max_tokens=NEW_TOKENS, ignore_eos=True, temperature=1.0, seed=s, **extra)
            for s in seeds]


def run_vllm(d: Path, gpu_util: float, reps: int) -> None:
    """vLLM alone: the same prompts, n, length and engine settings; both seedings, with and
    without log-probs (each row guarded: a failure is recorded, the others still run).
    `same_tokens`: every rep drew the tokens of the first (in-process vLLM; expected only for
    request seeds)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "model")
    reqs = [{"prompt_token_ids": tok(p)["input_ids"]} for p in prompts()]
    with PeakMemory() as mem:
        llm = vllm.LLM(model=str(d / "model"), dtype="bfloat16", gpu_memory_utilization=gpu_util, enforce_eager=False,
                       enable_prefix_caching=True, max_model_len=512, seed=0, generation_config="vllm")
        out = {"kv_cache_tokens": kv_cache_tokens(llm)}
        for seeding in SEEDINGS:
            for logprobs in (False, True):
                name, sp = vllm_row(seeding, logprobs), vllm_params(vllm, seeding, logprobs)
                try:
                    llm.generate(reqs, sp, use_tqdm=False)                     # warm-up (graphs, allocator)
                    times, drawn = [], []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        res = llm.generate(reqs, sp, use_tqdm=False)
                        times.append(time.perf_counter() - t0)
                        drawn.append([list(c.token_ids) for r in res for c in r.outputs])
                except Exception as e:     # noqa: BLE001 - one row's failure must not lose the others
                    out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    continue
                tokens = sum(len(c.token_ids) for r in res for c in r.outputs)
                out[name] = {"s": statistics.median(times), "tokens": tokens,
                             "tokens_per_s": tokens / statistics.median(times),
                             "same_tokens": all(x == drawn[0] for x in drawn)}
                print(f"vllm {name}: {out[name]}", flush=True)
    out["peak_gib"] = mem.peak_gib
    write(d, "vllm", out)


def mrl_config(d: Path, gpu_util: float, steps: int, extra: list[str], run_dir: Path) -> list[str]:
    return [f"model.path={d / 'model'}", "model.dtype=bfloat16", "model.layer_spec=sdpa",
            f"data.train_files=[{d / 'train.jsonl'}]", f"data.val_files=[{d / 'val.jsonl'}]",
            "data.use_chat_template=false", "data.train_batch_size=64", "data.max_prompt_length=64",
            "rollout.engine=vllm", f"rollout.n={SAMPLES}", f"rollout.max_new_tokens={NEW_TOKENS}",
            "rollout.ignore_eos=true", "rollout.temperature=1.0", f"rollout.gpu_memory_utilization={gpu_util}",
            "actor.micro_batch_size=32", "actor.mini_batch_size=0", "actor.ppo_epochs=1", "actor.optim.lr=1e-6",
            "algos.adv_estimator=grpo", "algos.policy_loss=ppo", "algos.loss_agg_mode=token-mean",
            "algos.use_kl_loss=false", "reward.name=e2e_vowels",
            f"reward.custom_functions={{e2e_vowels: {ROOT / 'tools' / 'bench_e2e.py'}:vowel_reward}}",
            "reward.num_workers=0", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]",
            f"trainer.total_steps={steps}", "trainer.val_before_train=false", "trainer.final_validation=false",
            "trainer.save_final=false", "trainer.save_every=0", "trainer.resume=none"] + extra


def run_mrl(d: Path, gpu_util: float, steps: int, extra: list[str], label: str) -> None:
    import shutil

    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.main import build_trainer

    run_dir = d / f"mrl_run_{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    with PeakMemory() as mem:
        tr = build_trainer(load_experiment_config(None, mrl_config(d, gpu_util, steps, extra, run_dir)))
        try:
            tr.fit()
        finally:
            tr.logger.close()
            tr.rewards.close()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "timing/step" in r][1:]
    med = lambda k: statistics.median(r[k] for r in rows) if rows and all(k in r for r in rows) else None
    phases = sorted({k for r in rows for k in r if k.startswith("timing/") and k != "timing/step"})
    split = sorted({k for r in rows for k in r if k.startswith("perf/vllm_")})   # the engine's generate split
    out = {"label": label, "extra": extra, "step_s": med("timing/step"), "steps": [r["timing/step"] for r in rows],
           "phases": {k[len("timing/"):]: med(k) for k in phases}, "peak_gib": mem.peak_gib,
           "rollout_split": {k[len("perf/vllm_"):]: med(k) for k in split},
           "kv_cache_tokens": kv_cache_tokens(getattr(tr.engine, "llm", None)),
           "gen_tokens_per_s": PROMPTS * SAMPLES * NEW_TOKENS / med("timing/rollout") if med("timing/rollout") else None,
           "offload_freed_gib": med("perf/offload_freed_gib"), "torch_reserved_gib": med("perf/torch_reserved_gib"),
           "torch_released_gib": med("perf/torch_released_gib"),
           "per_request_seed": bool(tr.cfg.rollout.vllm.per_request_seed),
           "engine_logprobs": bool(tr.plan.rollout.engine_logprobs),
           "offload_during_rollout": f"{tr.plan.rollout.offload_during_rollout} ({tr.plan.rollout.offload_reason})"}
    write(d, f"mrl_{label}", out)


def split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside brackets and braces (override values may be lists)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch in "[{(" else -1 if ch in "]})" else 0
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'LABEL:key=v,key=v' -> (LABEL, ["key=v", "key=v"]); the label names mrl_LABEL.json."""
    label, sep, rest = spec.partition(":")
    if not sep or not label.strip() or not label.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--variant {spec!r}: expected 'LABEL:key=value,key=value' (LABEL: letters, digits, - and _)")
    overrides = split_top(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--variant {spec!r}: {bad[0]!r} is not key=value")
    return label.strip(), overrides


def run_variants(a, env: dict) -> None:
    """Each variant in its own process (a fresh CUDA context and vLLM), one after another."""
    me, common = [sys.executable, __file__], ["--dir", str(a.dir), "--steps", str(a.steps), "--gpu-util", str(a.gpu_util)]
    for label, overrides in map(parse_variant, a.variant):
        print(f"== mrl {label}: {overrides}", flush=True)
        rc = subprocess.call(me + ["mrl", *common, "--label", label]
                             + [f"--override={o}" for o in [*a.override, *overrides]], env=env)
        if rc:
            print(f"mrl {label} exited {rc}", flush=True)


def run_trl(d: Path, gpu_util: float, steps: int) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    def reward(completions, **kw):
        return [vowel_reward(c) for c in completions]

    micro = 32
    args = GRPOConfig(output_dir=str(d / "trl_run"), per_device_train_batch_size=micro,
                      gradient_accumulation_steps=PROMPTS * SAMPLES // micro, num_generations=SAMPLES,
                      max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=1e-6, beta=0.0,
                      loss_type="dapo", num_iterations=1, use_vllm=True, vllm_mode="colocate",
                      vllm_gpu_memory_utilization=gpu_util, vllm_max_model_length=512,
                      generation_kwargs={"ignore_eos": True}, bf16=True, max_steps=steps, logging_steps=1,
                      report_to="none", save_strategy="no", seed=0)
    ds = Dataset.from_list([{"prompt": p} for p in prompts()] * 8)
    with PeakMemory() as mem:
        trainer = GRPOTrainer(model=str(d / "model"), reward_funcs=reward, args=args, train_dataset=ds,
                              callbacks=[StepTimes()])
        trainer.train()
    steps_s = [b - a for a, b in zip(ends, ends[1:])][1:]
    llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
    write(d, "trl", {"step_s": statistics.median(steps_s) if steps_s else None, "steps": steps_s,
                     "peak_gib": mem.peak_gib, "kv_cache_tokens": kv_cache_tokens(llm)})


# --- table --------------------------------------------------------------------------------------------
def table(d: Path) -> None:
    load = lambda p: json.loads(p.read_text()) if p.exists() else None
    v, trl = load(d / "vllm.json"), load(d / "trl.json")
    mrls = [load(p) for p in sorted(d.glob("mrl_*.json"))]
    gen_tok = PROMPTS * SAMPLES * NEW_TOKENS
    print(f"workload: SmolLM2-1.7B shape (random, bf16), {PROMPTS} prompts x {SAMPLES} x {NEW_TOKENS} tokens "
          f"({gen_tok} generated), one optimizer step per rollout\n")
    alone = lambda seeding, lp: (v or {}).get(vllm_row(seeding, lp), {}).get("s")
    f = lambda x, fmt="{:.2f}": fmt.format(x) if isinstance(x, (int, float)) else "-"
    if v:
        print("| vLLM alone | no log-probs s | tokens/s | `logprobs=0` s | tokens/s | same tokens per rep |\n"
              "|---|---:|---:|---:|---:|---|")
        for seeding in SEEDINGS:
            cells = []
            for lp in (False, True):
                row = v.get(vllm_row(seeding, lp), {})
                cells += [f(row.get("s")), f(row.get("tokens_per_s"), "{:,.0f}")] if "s" in row else [
                    row.get("error", "-")[:60], "-"]
            same = [str(v.get(vllm_row(seeding, lp), {}).get("same_tokens", "-")) for lp in (False, True)]
            print(f"| {seeding} | " + " | ".join(cells) + f" | {' / '.join(same)} |")
        print(f"\nvLLM alone: peak {v['peak_gib']:.1f} GiB, KV cache {v.get('kv_cache_tokens')} tokens\n")
    print("| run | seeding | step s (median 2..N) | rollout s | gen tokens/s | vs vLLM alone | old logprob s | "
          "update s | offload + onload s | weight sync s | reward s | torch reserved GiB | peak GiB | KV tokens | vs TRL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in mrls:
        p, seeding = m["phases"], "request_seed" if m.get("per_request_seed") else "engine_seed"
        ref = alone(seeding, m.get("engine_logprobs", False))
        moves = f"{f(p.get('offload'))} + {f(p.get('onload'))}" if p.get("offload") is not None else "-"
        print(f"| megatron-rl {m['label']} | {seeding} | {f(m['step_s'])} | {f(p.get('rollout'))} | "
              f"{f(m['gen_tokens_per_s'], '{:,.0f}')} | {f(p.get('rollout') / ref if ref and p.get('rollout') else None)}x | "
              f"{f(p.get('logprob'))} | {f(p.get('update'))} | {moves} | {f(p.get('weight_sync'))} | {f(p.get('reward'))} | "
              f"{f(m.get('torch_reserved_gib'), '{:.1f}')} | {f(m['peak_gib'], '{:.1f}')} | {m.get('kv_cache_tokens') or '-'} | "
              f"{f(m['step_s'] / trl['step_s'] if trl and trl.get('step_s') and m['step_s'] else None)} |")
    if trl:
        print(f"| TRL GRPOTrainer | engine seed (TRL's) | {f(trl['step_s'])} | - | - | - | - | - | - | - | - | - | "
              f"{f(trl['peak_gib'], '{:.1f}')} | {trl.get('kv_cache_tokens') or '-'} | 1.00 |")
    print("\nvs vLLM alone: the vLLM-alone row of the same seeding and log-prob setting. TRL 1.16 passes no "
          "per-request seed (vllm.LLM(seed=process_index // tp), n=1 per repeated prompt).")
    split_table([m for m in mrls if m.get("rollout_split")])


def split_table(mrls: list[dict]) -> None:
    """The rollout phase split by the vLLM engine's `perf/vllm_*_s` (medians of steps 2..N)."""
    if not mrls:
        return
    f = lambda x: f"{x:.3f}" if isinstance(x, (int, float)) else "-"
    print("\n| run | rollout s | vLLM wake s | generate s | outputs_to_batch s | sleep s | rest s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for m in mrls:
        sp, total = m["rollout_split"], m["phases"].get("rollout")
        parts = [sp.get(k) for k in ("wake_s", "generate_s", "outputs_s", "sleep_s")]
        rest = total - sum(parts) if total is not None and None not in parts else None
        print(f"| megatron-rl {m['label']} | {f(total)} | " + " | ".join(map(f, parts)) + f" | {f(rest)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["all", "prepare", "vllm", "mrl", "trl", "table"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/e2e"))
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".cache/demo/SmolLM2-135M-Instruct",
                    help="a directory with SmolLM2's tokenizer files (vocab 49152)")
    ap.add_argument("--steps", type=int, default=4, help="steps per run; times are the median of 2..N")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gpu-util", type=float, default=0.42, help="vLLM gpu_memory_utilization, both frameworks")
    ap.add_argument("--label", default="default")
    ap.add_argument("--override", action="append", default=[], help="extra megatron-rl config overrides")
    ap.add_argument("--variant", action="append", default=[],
                    help="'LABEL:key=v,key=v': one mrl run (own process) per variant, on top of --override")
    ap.add_argument("--skip", action="append", default=[], help="parts `all` leaves out")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    for spec in a.variant:
        parse_variant(spec)                         # refuse a malformed spec before any device work
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if a.part == "mrl" and a.variant:
        run_variants(a, env)
    elif a.part == "prepare":
        prepare(a.dir, a.tokenizer)
    elif a.part == "vllm":
        run_vllm(a.dir, a.gpu_util, a.reps)
    elif a.part == "mrl":
        run_mrl(a.dir, a.gpu_util, a.steps, a.override, a.label)
    elif a.part == "trl":
        run_trl(a.dir, a.gpu_util, a.steps)
    elif a.part == "table":
        table(a.dir)
    else:
        me = [sys.executable, __file__]
        common = ["--dir", str(a.dir), "--steps", str(a.steps), "--gpu-util", str(a.gpu_util)]
        runs = [me + ["prepare", "--dir", str(a.dir), "--tokenizer", str(a.tokenizer)],
                me + ["vllm", *common, "--reps", str(a.reps)],
                me + ["mrl", *common, "--label", a.label] + [f"--override={o}" for o in a.override],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", __file__,
                 "trl", *common]]
        for part, cmd in zip(["prepare", "vllm", "mrl", "trl"], runs):
            if part in a.skip:
                continue
            print(f"== {part}", flush=True)
            if part == "mrl" and a.variant:
                run_variants(a, env)
                continue
            rc = subprocess.call(cmd, env=env)
            if rc:
                print(f"{part} exited {rc}", flush=True)
        table(a.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
