"""Make an offline search-QA task whose answers exist only in a generated corpus.

    python tools/make_search_qa_data.py --out data/search_qa [--n-train 512] [--n-val 64]
                                        [--n-passages 100000] [--seed 0] [--few-shot 2]

Every question is about an invented entity ("What is the capital of the fictional
country Zorvania?"), so a policy can only answer it by searching; the answer sits in
one corpus passage ("Zorvania's capital is Kelmar."). The corpus also holds passages
about the same entities that do not answer (near misses) and, with --n-passages,
distractor passages about other invented entities (the retriever benchmark uses
100k). Writes train.jsonl / val.jsonl (chat `prompt`, `ground_truth` list, `uid`,
`data_source`) and corpus.jsonl (`id`, `contents` = title line + text).

`--few-shot K` puts K worked exchanges (question / search / information / answer, about
entities not in the corpus) before the question as earlier chat turns. A 135M model
ignores the tag instruction alone (0 of 32 validation questions searched) but imitates
in-context turns, which gives a short RL run rewards to learn from.
"""
from __future__ import annotations

import argparse
import json
import os
import random

from megatron_rl.data.writers import write_jsonl

INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as you want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>.")

SHORT_INSTRUCTION = ("Answer questions about fictional things. Search with <search> query </search>, "
                     "read the <information>, then answer with <answer> answer </answer>.")
# (question, query, [(title, passage)], answer): worked exchanges for --few-shot; none of
# these entities can appear in the generated corpus (all its words come from `Names`).
FEW_SHOT = [
    ("What is the capital of the fictional country Belmora?", "capital of Belmora",
     [("Belmora", "Belmora is a small inland country. Belmora's capital is Tessin."),
      ("Belmora", "Belmora is known for its salt exports and its mountain festivals.")], "Tessin"),
    ("Who designed the Garvik Tower?", "Garvik Tower designer",
     [("Garvik", "The Garvik Tower was designed by the architect Olen Marsk."),
      ("Garvik", "The Garvik Tower is a landmark built mostly of glass.")], "Olen Marsk"),
    ("Into which lake does the Ostwin river flow?", "Ostwin river lake",
     [("Ostwin", "The Ostwin river rises in the northern hills and flows into Lake Perrow."),
      ("Ostwin", "The Ostwin river is popular with anglers because of its tea mills.")], "Lake Perrow"),
]

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "qu", "r", "s",
           "st", "t", "th", "v", "vr", "z", "zh", "c", "ch", "sk", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "k", "m", "x"]
_SUFFIXES = ["ania", "ia", "or", "ar", "heim", "ovia", "esh", "ica", "on", "und"]
_GOODS = ["wool", "copper", "glass", "salt", "tea", "amber", "timber", "silk", "pottery", "honey"]

# (kind, question, answering passage, near-miss passage); {e} entity, {a} answer.
TEMPLATES = {
    "capital": ("What is the capital of the fictional country {e}?",
                "{e} is a small inland country. {e}'s capital is {a}.",
                "{e} is known for its {g} exports and its mountain festivals."),
    "river": ("Into which lake does the {e} river flow?",
              "The {e} river rises in the northern hills and flows into {a}.",
              "The {e} river is popular with anglers because of its {g} mills."),
    "architect": ("Who designed the {e} Tower?",
                  "The {e} Tower was designed by the architect {a}.",
                  "The {e} Tower is a landmark built mostly of {g}."),
    "founded": ("In which year was the {e} Company founded?",
                "The {e} Company was founded in {a} by a guild of merchants.",
                "The {e} Company trades in {g} along the coast."),
    "currency": ("What is the currency of the island of {e}?",
                 "The island of {e} uses the {a} as its currency.",
                 "The island of {e} is famous for {g} and quiet beaches."),
}


class Names:
    """Unique pronounceable invented words (deterministic for a seed)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self, syllables: int | None = None, suffix: bool = False) -> str:
        while True:
            n = syllables or self.rng.choice([2, 2, 3])
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                        for _ in range(n))
            if suffix:
                w += self.rng.choice(_SUFFIXES)
            w = w.capitalize()
            if w not in self.used and len(w) <= 14:
                self.used.add(w)
                return w


def make_answer(kind: str, names: Names, rng: random.Random) -> str:
    if kind == "river":
        return f"Lake {names.word()}"
    if kind == "architect":
        return f"{names.word()} {names.word()}"
    if kind == "founded":
        return str(rng.randint(1200, 1990))
    if kind == "currency":
        return f"{names.word(2).lower()}"
    return names.word()


def make_fact(names: Names, rng: random.Random, kind: str | None = None) -> dict:
    kind = kind or rng.choice(sorted(TEMPLATES))
    entity = names.word(suffix=kind == "capital")
    answer = make_answer(kind, names, rng)
    q, p, miss = TEMPLATES[kind]
    good = rng.choice(_GOODS)
    return {"kind": kind, "entity": entity, "answer": answer, "question": q.format(e=entity),
            "passage": p.format(e=entity, a=answer), "near_miss": miss.format(e=entity, g=good)}


def few_shot_turns(k: int) -> list[dict]:
    """k (user, assistant) chat turns showing the whole protocol, the observation in
    exactly the form the agent loop injects it."""
    from megatron_rl.agent.actions import OBS_CLOSE, OBS_OPEN

    if not 0 <= k <= len(FEW_SHOT):
        raise ValueError(f"--few-shot must be in 0..{len(FEW_SHOT)}, got {k}")
    turns = []
    for question, query, docs, answer in FEW_SHOT[:k]:
        info = "".join(f"Doc {i + 1}(Title: {t}) {p}\n" for i, (t, p) in enumerate(docs))
        turns += [{"role": "user", "content": f"Question: {question}"},
                  {"role": "assistant",
                   "content": f"<search> {query} </search>{OBS_OPEN}{info}{OBS_CLOSE}<answer> {answer} </answer>"}]
    return turns


def build(n_train: int, n_val: int, n_passages: int = 0, seed: int = 0, few_shot: int = 0):
    """(train records, val records, corpus records)."""
    rng = random.Random(seed)
    names = Names(rng)
    facts = [make_fact(names, rng) for _ in range(n_train + n_val)]
    corpus = []
    for i, f in enumerate(facts):
        corpus.append({"id": f"fact-{i}", "contents": f"{f['entity']}\n{f['passage']}"})
        corpus.append({"id": f"near-{i}", "contents": f"{f['entity']}\n{f['near_miss']}"})
    while len(corpus) < n_passages:       # distractors: facts nobody asks about
        f = make_fact(names, rng)
        text = f["passage"] if rng.random() < 0.5 else f["near_miss"]
        corpus.append({"id": f"distractor-{len(corpus)}", "contents": f"{f['entity']}\n{text}"})
    rng.shuffle(corpus)
    system = [{"role": "system", "content": SHORT_INSTRUCTION if few_shot else INSTRUCTION}]
    shots = few_shot_turns(few_shot)
    records = [{"uid": f"search_qa-{i}", "data_source": "search_qa",
                "prompt": system + shots + [{"role": "user", "content": f"Question: {f['question']}"}],
                "ground_truth": [f["answer"]], "kind": f["kind"]} for i, f in enumerate(facts)]
    return records[:n_train], records[n_train:], corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--n-passages", type=int, default=0,
                   help="pad the corpus with distractors up to this many passages (e.g. 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--few-shot", type=int, default=0,
                   help=f"worked exchanges before each question as chat turns (0..{len(FEW_SHOT)})")
    args = p.parse_args(argv)
    train, val, corpus = build(args.n_train, args.n_val, args.n_passages, args.seed, args.few_shot)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val), ("corpus.jsonl", corpus)):
        write_jsonl(os.path.join(args.out, name), rows)
    print(f"wrote {len(train)} train / {len(val)} val questions and {len(corpus)} passages to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
