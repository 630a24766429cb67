#!/usr/bin/env python
"""Build a small GAD distillation set from any JSONL of prompts and teacher responses.

    python tools/make_gad_data.py --prompts FILE.jsonl --out DIR \
        [--prompt-field prompt] [--teacher-field teacher_response] [--val 0.05] [--max N] [--seed 0]

Writes DIR/train.jsonl and DIR/val.jsonl with records `{"prompt", "teacher_response",
"source": "FILE:LINE"}` (what configs/gad*.yaml read). A prompt field may hold text or
chat messages ([{"role", "content"}], kept as is); a teacher field may hold text or
messages (the last assistant turn is taken). Records without both fields are skipped
and counted; a bad JSON line is an error naming the file and line.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def teacher_text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        return turns[-1] if turns and isinstance(turns[-1], str) else None
    return None


def read(path: Path, prompt_field: str, teacher_field: str) -> tuple[list[dict], int]:
    from megatron_rl.data.readers import DataError, read_jsonl

    rows, skipped = [], 0
    try:
        records = list(read_jsonl(path))
    except DataError as e:
        raise SystemExit(str(e)) from None
    for r in records:
        prompt, teacher = r.fields.get(prompt_field), teacher_text(r.fields.get(teacher_field))
        if not prompt or not teacher:
            skipped += 1
            continue
        rows.append({"prompt": prompt, "teacher_response": teacher, "source": f"{path.name}:{r.line}"})
    return rows, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True, type=Path, help="JSONL with prompts and teacher responses")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompt-field", default="prompt")
    ap.add_argument("--teacher-field", default="teacher_response")
    ap.add_argument("--val", type=float, default=0.05, help="validation fraction (at least 1 record)")
    ap.add_argument("--max", type=int, default=0, help="keep at most this many records (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows, skipped = read(args.prompts, args.prompt_field, args.teacher_field)
    if len(rows) < 2:
        raise SystemExit(f"{args.prompts}: {len(rows)} usable records (fields '{args.prompt_field}', "
                         f"'{args.teacher_field}'); need at least 2")
    random.Random(args.seed).shuffle(rows)
    if args.max:
        rows = rows[:args.max]
    n_val = min(len(rows) - 1, max(1, round(len(rows) * args.val)))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("val", rows[:n_val]), ("train", rows[n_val:])):
        with open(args.out / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows) - n_val} train / {n_val} val records to {args.out} "
          f"(skipped {skipped} without both fields)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
