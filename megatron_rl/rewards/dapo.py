"""DAPO's rewards: the math answer after "Answer:" (the DAPO-Math-17k prompt asks for
`Answer: $Answer`), compared after DAPO's normalisation, and the overlong penalty.

Behaviour follows verl's `math_dapo.py` (the DAPO recipe's scorer), re-implemented:
only the last 300 characters of the response are searched; the answer is the text after
the last `Answer:` on its line (case-insensitive); both sides are normalised
(`normalize_final_answer`: right of the last `=`, a fixed list of substitutions and
unit words removed, `\\text{}` / `\\textbf{}` / `\\overline{}` / `\\boxed{}` unwrapped,
`\\fracab` -> `\\frac{a}{b}`, `$` dropped, digit-grouping commas dropped) and compared as
strings. The score is +1 / -1 (DAPO's), with `acc` (bool) and `pred` as extras.
`strict_box: true` instead takes the last `\\boxed{}` of the last 100 characters.
"""
from __future__ import annotations

import re
from typing import Any

from megatron_rl.rewards.math_boxed import last_boxed
from megatron_rl.rewards.registry import register_reward

SEARCH_CHARS = 300
STRICT_BOX_CHARS = 100
_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# (before, after) in this order, then the removed words: DAPO's lists.
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
            r",\!", "{,}", '"', "\\dots"]
_UNWRAP = [re.compile(r"(\\text\{)(.*?)(\})"), re.compile(r"(\\textbf\{)(.*?)(\})"),
           re.compile(r"(\\overline\{)(.*?)(\})"), re.compile(r"(\\boxed\{)(.*)(\})")]


def normalize_final_answer(answer: str) -> str:
    s = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        s = s.replace(before, after)
    for word in _REMOVED:
        s = s.replace(word, "")
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", s)      # the first $...$ span
    for pattern in _UNWRAP:
        s = pattern.sub(r"\2", s)
    s = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", s)
    s = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def extract_answer(response: str) -> str | None:
    found = _ANSWER.findall(response[-SEARCH_CHARS:])
    return found[-1] if found else None


def dapo_math_score(response: str, ground_truth: Any, strict_box: bool = False) -> dict[str, Any]:
    """{"score": 1.0 | -1.0, "acc": bool, "pred": str} (module docstring)."""
    truth = str(ground_truth)
    if strict_box:
        boxed = last_boxed(response[-STRICT_BOX_CHARS:])
        pred = "[INVALID]" if boxed is None else normalize_final_answer(boxed)
        correct = boxed is not None and pred == normalize_final_answer(truth)
    else:
        found = extract_answer(response)
        pred = normalize_final_answer(found if found is not None else "[INVALID]")
        correct = found is not None and pred == normalize_final_answer(truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


@register_reward("math_dapo", "dapo_math")
def dapo_math_reward(response: str, sample: dict, strict_box: bool = False) -> dict[str, Any]:
    return dapo_math_score(response, sample["ground_truth"], strict_box)


def overlong_penalty(response_length: int, max_length: int, buffer_len: int, penalty_factor: float) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_length - buffer_len` tokens, then falling
    linearly to `-penalty_factor` at `max_length` (added to the task reward)."""
    expected = max_length - buffer_len
    return min(-(response_length - expected) / buffer_len * penalty_factor, 0.0)
