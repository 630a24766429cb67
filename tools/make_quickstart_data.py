#!/usr/bin/env python
"""Write train.jsonl / val.jsonl for the CPU quickstart: single-digit addition.

A 135M policy gets ~8 GRPO steps on a laptop CPU, so the task must be learnable in
that many. Rows: {"prompt": [messages], "ground_truth": "7", "data_source": "quickstart"};
the `quickstart` reward gives 0.2 for a `#### <number>` line and 1.0 for the right number.

The prompt is one-shot: a short system turn ("Add.", which also replaces SmolLM2's
longer default one) and one worked example ("3 + 1 = 4\n#### 4"). Measured on
SmolLM2-135M-Instruct, sampling at temperature 1 (96 samples, 4 per prompt): the
zero-shot instruction "What is 3 + 4? Give only the number, as: #### <number>" never
produced `####` (reward 0.00, no GRPO signal); this one-shot prompt scores 0.46 on
average with reward differences inside 23 of 24 groups, leaving room to climb.
Prompts are 48 tokens with SmolLM2's chat template.

    python tools/make_quickstart_data.py --out data/quickstart [--n-train 512 --n-val 64 --seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "Add."
EXAMPLE = [{"role": "user", "content": "3 + 1?"}, {"role": "assistant", "content": "3 + 1 = 4\n#### 4"}]


def make_row(a: int, b: int) -> dict:
    return {"prompt": [{"role": "system", "content": SYSTEM}, *EXAMPLE,
                       {"role": "user", "content": f"{a} + {b}?"}],
            "ground_truth": str(a + b), "data_source": "quickstart"}


def make_split(n: int, rng: random.Random) -> list[dict]:
    # 100 distinct (a, b) pairs: cycle through shuffled copies so every pair appears
    # about equally often whatever n is.
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        block = [(a, b) for a in range(10) for b in range(10)]
        rng.shuffle(block)
        pairs.extend(block)
    return [make_row(a, b) for a, b in pairs[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_jsonl(out / "train.jsonl", make_split(args.n_train, rng))
    write_jsonl(out / "val.jsonl", make_split(args.n_val, rng))
    print(f"wrote {args.n_train} train and {args.n_val} val prompts to {out}")


if __name__ == "__main__":
    main()
