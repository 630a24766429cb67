"""Math answers in the last `\\boxed{...}` (nested braces allowed), compared after a
light normalisation (spaces, `\\left`/`\\right`, `\\text{}`, `dfrac`, trailing dot,
units of degrees and percent) and numerically where both sides are numbers.

Not a symbolic checker: `1/2` and `\\frac{1}{2}` differ. Use math-verify through
`reward.custom_functions` where that matters.
"""
from __future__ import annotations

import re
from typing import Any

from megatron_rl.rewards.registry import register_reward


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` or `\\fbox{...}` (or `\\boxed x`), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" "):
        word = rest.strip().split("$")[0].split()
        return word[0] if word else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced


_REMOVE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "$", "\\%", "%", "^\\circ", "^{\\circ}", "\\displaystyle")
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")


def normalize_math(answer: str) -> str:
    s = answer.strip()
    s = _TEXT.sub(r"\1", s)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d*)?", s):
        s = s.replace(",", "")
    if s.startswith("."):
        s = "0" + s
    return s


def _as_number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def is_equiv(a: str, b: str) -> bool:
    na, nb = normalize_math(a), normalize_math(b)
    if na == nb:
        return True
    fa, fb = _as_number(na), _as_number(nb)
    return fa is not None and fb is not None and abs(fa - fb) <= 1e-6 * max(1.0, abs(fb))


def boxed_score(response: str, ground_truth: Any) -> float:
    answer = last_boxed(response)
    if answer is None:
        return 0.0
    truth = str(ground_truth)
    truth = last_boxed(truth) or truth
    return 1.0 if is_equiv(answer, truth) else 0.0


@register_reward("math", "boxed")
def boxed_reward(response: str, sample: dict) -> float:
    return boxed_score(response, sample["ground_truth"])
