"""Exact match on the last `<answer>...</answer>` with SQuAD-style normalisation
(lower case, no punctuation, no articles, single spaces), as in Search-R1."""
from __future__ import annotations

import re
import string
from typing import Any, Iterable

from megatron_rl.rewards.registry import register_reward

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def extract_answer(response: str) -> str | None:
    found = _ANSWER.findall(response)
    return found[-1] if found else None


def _targets(ground_truth: Any) -> list[str]:
    if isinstance(ground_truth, dict) and "target" in ground_truth:   # Search-R1 data
        ground_truth = ground_truth["target"]
    if isinstance(ground_truth, str):
        return [ground_truth]
    if isinstance(ground_truth, Iterable):
        return [str(g) for g in ground_truth]
    return [str(ground_truth)]


def qa_exact_match(response: str, ground_truth: str | list[str]) -> float:
    """1.0 if the last `<answer>` matches any ground truth after normalisation, else 0.0
    (also 0.0 when the response has no `<answer>` tag)."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    norm = normalize_answer(answer)
    return 1.0 if any(norm == normalize_answer(t) for t in _targets(ground_truth)) else 0.0


@register_reward("qa_em", "nq", "hotpotqa", "triviaqa")
def qa_em_reward(response: str, sample: dict) -> float:
    return qa_exact_match(response, sample["ground_truth"])
