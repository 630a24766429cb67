"""Writing prompt sets: JSONL written atomically, and the CLI every `tools/make_*_data.py` shares."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterable


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """One JSON object per line; written to `path.tmp` then renamed, so a crash leaves no half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def prompt_set_parser(description: str) -> argparse.ArgumentParser:
    """--out, --n-train, --n-val, --seed: the options of every synthetic prompt-set script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def write_splits(out: str | os.PathLike, train: list[dict], val: list[dict]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    print(f"wrote {len(train)} train and {len(val)} val prompts to {out}")
    return out
