"""Samples/s of `trainer.async.mode` sync, one_step_off and fully_async on the same processes.

    python tools/bench_async.py [--config configs/quickstart_async_cpu.yaml] [--steps 4] [--nproc 2]
                                [--modes sync,one_step_off,fully_async,fully_async+partial] [section.key=value ...]

`fully_async+partial` is fully_async with `trainer.async.partial_rollout=true` (a weight push
interrupts the generation in flight; "mid-gen pushes" counts them).

Each mode is one `launch/torchrun.sh` run of the same config (placement disaggregated, the same
steps, prompts and seeds; no validation, no checkpoint). "train wall s" is the sum of the steps'
`timing/step` (start-up and model loading left out), samples/s = samples trained / that. Prints a
markdown table (docs/BENCHMARKS.md keeps the measured one).
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

ROOT = Path(__file__).resolve().parents[1]


def mode_overrides(mode: str) -> list[str]:
    """`mode` or `mode+partial` as config overrides."""
    name, _, flag = mode.partition("+")
    if flag not in ("", "partial"):
        raise SystemExit(f"--modes: {mode!r}: the only suffix is +partial (trainer.async.partial_rollout=true)")
    return [f"trainer.async.mode={name}"] + (["trainer.async.partial_rollout=true"] if flag else [])


def run_mode(config: str, mode: str, steps: int, nproc: int, extra: list[str], run_dir: Path) -> dict:
    overrides = [*mode_overrides(mode), f"trainer.total_steps={steps}", "trainer.val_before_train=false",
                 "trainer.final_validation=false", "trainer.save_final=false", "trainer.save_every=0",
                 "trainer.resume=none", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]", *extra]
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--cpu", "--nproc", str(nproc), "--", "--config", config,
           *overrides]
    shutil.rmtree(run_dir, ignore_errors=True)       # metrics.jsonl appends: a previous run's rows would count
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    rows = [r for r in rows if r.get("step", 0) >= 1]
    train_s = sum(r["timing/step"] for r in rows)
    return {"mode": mode, "steps": len(rows), "train_s": train_s, "process_s": wall, "rows": rows,
            "wait_s": sum(r.get("async/trainer_wait_s", 0.0) for r in rows),
            "overlap_s": sum(r.get("async/overlap_s", 0.0) for r in rows),
            "staleness_max": max(r.get("async/staleness_max", 0.0) for r in rows),
            "interrupts": sum(r.get("async/interrupts", 0.0) for r in rows),
            "token_staleness": sum(r.get("async/token_staleness_mean", 0.0) for r in rows) / max(len(rows), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart_async_cpu.yaml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--modes", default="sync,one_step_off,fully_async")
    ap.add_argument("--out", default="runs/bench_async")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from megatron_rl.config import load_experiment_config

    cfg = load_experiment_config(args.config, args.overrides)
    per_step = cfg.data.train_batch_size * cfg.rollout.n
    results, load_before = [], _load()
    for mode in args.modes.split(","):
        r = run_mode(args.config, mode, args.steps, args.nproc, args.overrides, ROOT / args.out / mode)
        r["samples"] = r["steps"] * per_step
        results.append(r)
        print(f"{mode}: {r['train_s']:.1f}s", file=sys.stderr, flush=True)
    base = results[0]["samples"] / results[0]["train_s"]
    print(f"| mode | steps | samples | train wall s | samples/s | vs {results[0]['mode']} | trainer wait s | "
          "overlap s | max staleness | token staleness | mid-gen pushes | process s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        sps = r["samples"] / r["train_s"]
        print(f"| {r['mode']} | {r['steps']} | {r['samples']} | {r['train_s']:.1f} | {sps:.2f} | {sps / base:.2f}x | "
              f"{r['wait_s']:.1f} | {r['overlap_s']:.1f} | {r['staleness_max']:.0f} | {r['token_staleness']:.2f} | {r['interrupts']:.0f} | "
              f"{r['process_s']:.0f} |")
    print(f"\n{args.config}, {args.nproc} processes ({cfg.rollout.num_ranks} rollout), {os.cpu_count()} CPU cores, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average before/after {load_before} / {_load()}")
    return 0


def _load() -> str:
    """The 1/5/15-minute load averages (the machine may be shared: say how busy it was)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
