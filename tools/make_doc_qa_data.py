#!/usr/bin/env python
"""Write train.jsonl / val.jsonl for the token-weights demo: questions answered by a document.

Each prompt holds a short document between `<document>` and `</document>` (the context
span `token_weights.context_markers` finds) with three facts of one kind (where three
people live, which pet they own, ...) and, after it, the instruction and a question
about one of them. Only the document says which candidate is right, so responses that
read it score; the `doc_qa` reward (megatron_rl/token_weights/doc_qa.py) gives 1.0
for the answer alone, 0.5 for the answer among other candidates, 0 otherwise.
Rows: {"prompt": [messages], "ground_truth": "Rome", "distractors": [...], "data_source": "doc_qa"}.

    python tools/make_doc_qa_data.py --out data/generated/doc_qa [--n-train 512 --n-val 64 --seed 0]
"""
from __future__ import annotations

import random
from megatron_rl.data.writers import prompt_set_parser, write_splits

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo"]
KINDS = {
    "city": (["Paris", "Rome", "Oslo", "Madrid", "Berlin", "Vienna", "Lisbon", "Prague", "Dublin", "Athens"],
             "{name} lives in {value}.", "Where does {name} live?"),
    "pet": (["cat", "dog", "parrot", "rabbit", "horse", "turtle", "hamster", "goat"],
            "{name} owns a {value}.", "Which animal does {name} own?"),
    "colour": (["red", "blue", "green", "yellow", "black", "white", "orange", "purple"],
               "{name} drives a {value} car.", "What colour is the car of {name}?"),
}
SYSTEM = "Answer the question with one word taken from the document."


def make_row(rng: random.Random) -> dict:
    kind = rng.choice(sorted(KINDS))
    values, fact, question = KINDS[kind]
    names = rng.sample(NAMES, 3)
    picked = rng.sample(values, 3)
    doc = " ".join(fact.format(name=n, value=v) for n, v in zip(names, picked))
    target = rng.randrange(3)
    user = f"<document>\n{doc}\n</document>\n{question.format(name=names[target])}"
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "ground_truth": picked[target], "distractors": [v for i, v in enumerate(picked) if i != target],
            "data_source": "doc_qa"}


def main(argv: list[str] | None = None) -> None:
    args = prompt_set_parser(__doc__.splitlines()[0]).parse_args(argv)
    rng = random.Random(args.seed)
    write_splits(args.out, [make_row(rng) for _ in range(args.n_train)], [make_row(rng) for _ in range(args.n_val)])


if __name__ == "__main__":
    main()
