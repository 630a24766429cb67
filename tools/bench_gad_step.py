"""Time one GAD step by phase: student rollout, reward (discriminator scoring),
old log-probs, reference log-probs, discriminator update, actor update.

Builds everything offline: a random-weight model of the shape in
`--model-src/config.json` (SmolLM2-135M-Instruct by default; no real weights
needed, only config.json + tokenizer files), synthetic prompts with teacher
responses, and the real `GADTrainer` (student, reference, discriminator, native
engine). Each phase is timed by wrapping the method that does it on the built
trainer (CUDA-synchronised), so the step itself is exactly the trainer's. The
first `--warmup` steps are not counted; the table is the mean of the rest.

    python tools/bench_gad_step.py                 # GPU, SmolLM2-135M shape, < 4 min on an H100
    python tools/bench_gad_step.py --tiny          # CPU smoke run (2 layers, hidden 64)

Writes `$OUT/gad_results.md` (and `gad_results.json`) when `$OUT` is set.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEMO = Path(".cache/demo/SmolLM2-135M-Instruct")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
# (phase, object attribute path, method): the trainer method that does each phase
PHASES = (("rollout", "engine", "generate"),
          ("reward (D scoring)", "discriminator", "scores"),
          ("logprob (old)", "actor", "compute_logprobs"),
          ("ref logprob", "reference", "compute_logprobs"),
          ("d_update", "discriminator", "update"),
          ("actor update", "actor", "update"))
WORDS = ("the a river tower city north south old new bright quiet small large red green blue stone glass "
         "market bridge garden library harbor festival winter summer morning evening").split()


def make_random_model(src: Path, out: Path, tokenizer_dir: Path | None = None, **overrides) -> Path:
    """A random-weight HF checkpoint of `src/config.json`'s shape (+ overrides) with the tokenizer files."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(src)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(
        out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if ((tokenizer_dir or src) / f).exists():
            shutil.copy2((tokenizer_dir or src) / f, out / f)
    return out


def make_data(out: Path, n: int, teacher_words: int, seed: int = 0) -> None:
    """Prompts with teacher responses of `teacher_words` words (a fixed signature at the end)."""
    import random

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("val", max(2, n // 8))):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(count):
                q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
                t = " ".join(rng.choice(WORDS) for _ in range(teacher_words)) + " That is all."
                f.write(json.dumps({"uid": f"{split}-{i}", "prompt": [{"role": "user", "content": f"Describe: {q}"}],
                                    "teacher_response": t}) + "\n")


def time_phases(trainer) -> dict[str, float]:
    """Wrap each phase's method on the built trainer; returns the dict the wrappers add seconds into."""
    spent: dict[str, float] = defaultdict(float)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for phase, owner, method in PHASES:
        obj = getattr(trainer, owner)
        if obj is None:
            continue
        fn = getattr(obj, method)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _phase=phase, **kw):
            sync()
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                sync()
                spent[_phase] += time.perf_counter() - t0
        setattr(obj, method, timed)
    return spent


def overrides(args, model: Path, data: Path, run_dir: Path) -> list[str]:
    gpu = torch.cuda.is_available()
    return [f"model.path={model}", f"model.dtype={'bfloat16' if gpu else 'float32'}",
            f"model.layer_spec={args.layer_spec}",
            f"data.train_files=[{data / 'train.jsonl'}]", f"data.val_files=[{data / 'val.jsonl'}]",
            "data.teacher_response_key=teacher_response", f"data.train_batch_size={args.prompts}",
            "data.max_prompt_length=128", "data.shuffle=false",
            f"rollout.n={args.n}", "rollout.temperature=0.8", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"actor.micro_batch_size={args.micro_batch_size}", "actor.mini_batch_size=0", "actor.optim.lr=1e-6",
            "algos.adv_estimator=grpo", "algos.policy_loss=gspo", "algos.use_kl_loss=true",
            "algos.kl_loss_kind=low_var_kl", "algos.kl_loss_coef=0.001",
            "gad.enable=true", f"gad.d_micro_batch_size={args.micro_batch_size}", "gad.d_lr=1e-6",
            "gad.log_rule_reward=false", "reward.name=format", "reward.num_workers=0",
            # one step more than run: no validation falls inside a timed step
            f"trainer.total_steps={args.warmup + args.steps + 1}", "trainer.val_every=0", "trainer.critic_warmup=0",
            "trainer.val_before_train=false", "trainer.save_every=0", "trainer.resume=none",
            f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]"]


def table(phases: dict[str, float], step_s: float, meta: dict) -> str:
    rows = ["| phase | seconds | share of step |", "|---|---:|---:|"]
    for name, _, _ in PHASES:
        if name in phases:
            rows.append(f"| {name} | {phases[name]:.3f} | {100 * phases[name] / step_s:.1f}% |")
    other = step_s - sum(phases.values())
    rows.append(f"| other (advantages, batching, host work) | {other:.3f} | {100 * other / step_s:.1f}% |")
    rows.append(f"| **step** | **{step_s:.3f}** | 100% |")
    head = ", ".join(f"{k}={v}" for k, v in meta.items())
    return f"GAD step by phase ({head})\n\n" + "\n".join(rows) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-src", type=Path, default=DEMO, help="dir with config.json (+ tokenizer files)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer files from here instead")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, small batch: a CPU smoke run")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--teacher-words", type=int, default=120)
    ap.add_argument("--micro-batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--layer-spec", default="auto")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.prompts, args.n, args.max_new_tokens, args.teacher_words = 2, 2, 4, 6
        args.micro_batch_size, args.steps, args.warmup = 4, 1, 0
        args.layer_spec = "local"

    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.gad import build_gad_trainer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_gad_"))
    t0 = time.perf_counter()
    model = make_random_model(args.model_src, work / "model", args.tokenizer, **(TINY if args.tiny else {}))
    make_data(work / "data", max(args.prompts * (args.steps + args.warmup), 8), args.teacher_words)
    cfg = load_experiment_config(None, overrides(args, model, work / "data", work / "run"))
    trainer = build_gad_trainer(cfg)
    setup_s = time.perf_counter() - t0
    spent = time_phases(trainer)
    per_step, step_times, samples = [], [], 0
    try:
        for step in range(1, args.warmup + args.steps + 1):
            spent.clear()
            ts = time.perf_counter()
            metrics = trainer.train_step(step)
            trainer.logger.log(metrics, step=step)
            if step > args.warmup:
                step_times.append(time.perf_counter() - ts)
                per_step.append(dict(spent))
                samples = args.prompts * args.n
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    phases = {k: sum(p.get(k, 0.0) for p in per_step) / len(per_step) for k in per_step[0]}
    step_s = sum(step_times) / len(step_times)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"device": device, "model": "tiny" if args.tiny else args.model_src.name + " shape (random weights)",
            "dtype": cfg.model.dtype, "layer_spec": cfg.model.layer_spec, "prompts": args.prompts, "n": args.n,
            "samples": samples, "max_new_tokens": args.max_new_tokens, "micro_batch": args.micro_batch_size,
            "timed_steps": args.steps}
    md = table(phases, step_s, meta)
    print(md, flush=True)
    result = {"meta": meta, "phases_s": phases, "step_s": step_s, "setup_s": setup_s,
              "response_length_mean": metrics.get("response_length/mean"),
              "d_acc": metrics.get("critic/d_acc")}
    print(json.dumps(result), flush=True)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "gad_results.md").write_text(md)
        (out / "gad_results.json").write_text(json.dumps(result, indent=1))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
