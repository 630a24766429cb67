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

import random
from megatron_rl.data.writers import prompt_set_parser, write_splits

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


def main(argv: list[str] | None = None) -> None:
    args = prompt_set_parser(__doc__.splitlines()[0]).parse_args(argv)
    rng = random.Random(args.seed)
    write_splits(args.out, make_split(args.n_train, rng), make_split(args.n_val, rng))


if __name__ == "__main__":
    main()
