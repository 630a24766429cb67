#!/usr/bin/env python
"""Write a small synthetic chart/geometry image-QA set (PIL drawings with ground truth).

Two tasks, as in EasyR1's geometry/chart RL data but drawn here so nothing is downloaded:
  count    "How many red circles are in the image?"      circles of one colour among
           squares and circles of other colours; answer a digit (1..4)
  tallest  "Which bar is the tallest? Answer with its colour."   a bar chart of three or
           four coloured bars; answer the colour word
Rows use verl/EasyR1's multimodal schema, read by `data.image` (data/multimodal.py):
  {"prompt": [{"role": "user", "content": "<image>How many ..."}], "images": ["images/train_0.png"],
   "ground_truth": "3", "data_source": "image_qa", "extra_info": {"task": "count"}}
image paths are relative to the JSONL file; `--format parquet` writes the PNG bytes into
the rows instead (`images: [{"bytes": ...}]`, as HF datasets store images). Score with the
`image_qa` reward (megatron_rl/rewards/image_qa.py).

    python tools/make_image_qa_data.py --out data/generated/image_qa [--size 56 --n-train 512 --n-val 64]
"""
from __future__ import annotations

import io
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rl.data.writers import prompt_set_parser, write_jsonl  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}
COUNT_RANGE = (1, 4)
TASKS = ("count", "tallest")
ANSWER_WORDS = [str(n) for n in range(COUNT_RANGE[0], COUNT_RANGE[1] + 1)] + list(COLOURS)


def draw_count(rng: random.Random, size: int):
    """Circles of a target colour among distractors of other colours and shapes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    target = rng.choice(sorted(COLOURS))
    n = rng.randint(*COUNT_RANGE)
    others = [c for c in COLOURS if c != target]
    shapes = [("circle", target)] * n + [(rng.choice(("circle", "square")), rng.choice(others))
                                         for _ in range(rng.randint(0, 2))]
    r = max(3, size // 12)
    cells = [(x, y) for x in range(3) for y in range(3)]          # a 3x3 grid keeps shapes apart
    for (shape, colour), (cx, cy) in zip(shapes, rng.sample(cells, len(shapes))):
        x = int((cx + 0.5) * size / 3 + rng.uniform(-r / 2, r / 2))
        y = int((cy + 0.5) * size / 3 + rng.uniform(-r / 2, r / 2))
        box = (x - r, y - r, x + r, y + r)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img, f"How many {target} circles are in the image? Answer with one number.", str(n)


def draw_tallest(rng: random.Random, size: int):
    """A bar chart with one strictly tallest bar."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    colours = rng.sample(sorted(COLOURS), rng.choice((3, 4)))
    heights = rng.sample(range(2, 10), len(colours))            # distinct: one tallest bar
    width = size / (len(colours) * 1.5 + 0.5)
    d.line((0, size - 2, size, size - 2), fill=(0, 0, 0))
    for i, (colour, h) in enumerate(zip(colours, heights)):
        x0 = width * (0.5 + 1.5 * i)
        top = size - 2 - h * (size - 6) / 10
        d.rectangle((x0, top, x0 + width, size - 3), fill=COLOURS[colour])
    tallest = colours[heights.index(max(heights))]
    return img, "Which bar is the tallest? Answer with its colour.", tallest


DRAW = {"count": draw_count, "tallest": draw_tallest}


def make_rows(split: str, n: int, rng: random.Random, size: int, image_dir: Path, inline: bool) -> list[dict]:
    rows = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        img, question, answer = DRAW[task](rng, size)
        if inline:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            image = {"bytes": buf.getvalue()}
        else:
            image = f"{image_dir.name}/{split}_{i}.png"
            img.save(image_dir / f"{split}_{i}.png")
        rows.append({"prompt": [{"role": "user", "content": f"<image>{question}"}], "images": [image],
                     "ground_truth": answer, "data_source": "image_qa", "extra_info": {"task": task, "index": i}})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = prompt_set_parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=56, help="image side in pixels (56: 4 tokens on Qwen2-VL)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    image_dir = out / "images"
    inline = args.format == "parquet"
    (out if inline else image_dir).mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        rows = make_rows(split, n, rng, args.size, image_dir, inline)
        if inline:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), out / f"{split}.parquet")
        else:
            write_jsonl(out / f"{split}.jsonl", rows)
    print(f"wrote {args.n_train} train and {args.n_val} val image prompts to {out} ({args.format})")


if __name__ == "__main__":
    main()
