"""One GPU call that checks and times the foundation and the trainer on an H100.

1. Megatron vs transformers logits in bf16 (local and sdpa specs) on a
   SmolLM2-135M-shaped model (random weights: the real ones exceed the device
   transfer limit; the config and tokenizer are SmolLM2's).
2. A short GRPO run of that model through `megatron-rl train` (native engine, fused
   Triton loss, bf16, sdpa spec) with its step time broken down by phase.
Prints a table; writes `gpu_validate.json` (and the run's metrics) under $OUT.

    python tools/gpu_validate.py --model-config DIR_WITH_config.json_AND_TOKENIZER
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_random_model(src: Path, out: Path) -> Path:
    import transformers

    if (out / "config.json").exists():
        return out
    cfg = transformers.AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy2(src / f, out / f)
    return out


def parity(model_dir: Path) -> list[dict]:
    import transformers

    from megatron_rl.models.parity import compare_logits

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    return", "1 + 1 = 2, 2 + 2 ="] * 4
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    rows = []
    for spec in ("local", "sdpa"):
        for dtype in (torch.float32, torch.bfloat16):
            r = compare_logits(model_dir, enc["input_ids"], enc["attention_mask"], dtype=dtype, layer_spec=spec)
            rows.append({"spec": spec, "dtype": str(dtype).split(".")[-1], **r})
    return rows


def grpo_run(model_dir: Path, out: Path, steps: int) -> dict:
    run_dir = out / "grpo_run"
    cmd = [sys.executable, "-m", "megatron_rl.cli", "train", "--config", "configs/quickstart_cpu.yaml",
           f"model.path={model_dir}", "model.dtype=bfloat16", "model.layer_spec=sdpa",
           f"trainer.total_steps={steps}", "trainer.val_before_train=false", "data.val_batch_size=64",
           "data.train_batch_size=32", "rollout.n=8", "rollout.max_new_tokens=128", "actor.micro_batch_size=64",
           "actor.mini_batch_size=128", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]",
           "trainer.keep_last=1"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    print(proc.stdout[-3000:], proc.stderr[-6000:] if proc.returncode else "", flush=True)
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        shutil.copy2(run_dir / "metrics.jsonl", out / "grpo_metrics.jsonl")
    return {"returncode": proc.returncode, "wall_s": wall, "steps": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/gpu_validate"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = make_random_model(args.model_config, Path("/tmp/smollm2-random"))
    print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    rows = parity(model_dir)
    print("\n| spec | dtype | max abs diff | mean abs diff | max |logit| | megatron s | hf s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | {r['dtype']} | {r['max_abs_diff']:.3e} | {r['mean_abs_diff']:.3e} | "
              f"{r['logit_scale']:.2f} | {r['megatron_s']:.3f} | {r['hf_s']:.3f} |", flush=True)
    grpo = grpo_run(model_dir, out, args.steps)
    print("\n| step | rollout s | reward s | logprob s | advantage s | update s | step s | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in grpo["steps"]:
        if r.get("step", 0) == 0:
            continue
        print(f"| {r['step']} | {r.get('timing/rollout', 0):.2f} | {r.get('timing/reward', 0):.2f} | "
              f"{r.get('timing/logprob', 0):.2f} | {r.get('timing/advantage', 0):.2f} | "
              f"{r.get('timing/update', 0):.2f} | {r.get('timing/step', 0):.2f} | {r.get('perf/tokens_per_s', 0):.0f} |")
    (out / "gpu_validate.json").write_text(json.dumps({"parity": rows, "grpo": grpo}, indent=2, default=str))


if __name__ == "__main__":
    main()
