"""Conversion time and peak host memory, HF -> Megatron and back, for one model.

Each direction runs in a fresh process (`megatron-rl convert ...`); peak memory is
the largest resident set of that process tree (ru_maxrss of the children).

    python tools/bench_conversion.py [--hf-dir .cache/demo/SmolLM2-135M-Instruct] [--tp 3]  (SmolLM2 has 3 KV heads: TP 1 or 3)
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS GB of the children) for one command in a fresh process."""
    code = ("import resource, subprocess, sys, time; t=time.time(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(time.time()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout
    secs, rss_kb = out.split()
    return float(secs), float(rss_kb) / 1024**2


def dir_gb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1024**3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", default=".cache/demo/SmolLM2-135M-Instruct")
    ap.add_argument("--tp", type=int, default=3)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "megatron_rl.cli", "convert"]
    with tempfile.TemporaryDirectory() as tmp:
        mc, hf2 = Path(tmp) / "mcore", Path(tmp) / "hf"
        t1, m1 = run(cli + ["hf-to-mcore", "--hf-dir", args.hf_dir, "--out", str(mc), "--tp", str(args.tp)])
        t2, m2 = run(cli + ["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(hf2)])
        size = dir_gb(Path(args.hf_dir))
        print(f"model: {args.hf_dir} ({size:.2f} GB of safetensors)")
        print("| direction | seconds | peak RSS of one process GB |")
        print("|---|---:|---:|")
        print(f"| hf-to-mcore (tp={args.tp}, {args.tp} processes) | {t1:.1f} | {m1:.2f} |")
        print(f"| mcore-to-hf | {t2:.1f} | {m2:.2f} |")


if __name__ == "__main__":
    main()
