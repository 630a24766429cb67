"""GSM8K: the number after `#### ` against the ground truth (verl's gsm8k.py rules).

strict:   the last `#### <number>` in the response (the model must use the format);
flexible: the last number anywhere in the response.
Only the last 300 characters are searched (long regex scans are slow; the answer is
at the end). Commas and `$` are dropped before comparing strings.
"""
from __future__ import annotations

import re
from typing import Any

from megatron_rl.rewards.registry import register_reward

CLIP_CHARS = 300
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")


def extract_solution(response: str, method: str = "strict") -> str | None:
    if method not in ("strict", "flexible"):
        raise ValueError(f"gsm8k method must be strict|flexible, got '{method}'")
    text = response[-CLIP_CHARS:]
    if method == "strict":
        found = _STRICT.findall(text)
        return found[-1].replace(",", "").replace("$", "") if found else None
    for candidate in reversed(_NUMBER.findall(text)):
        if candidate not in ("", "."):
            return candidate
    return None


def normalize_ground_truth(ground_truth: Any) -> str:
    """`72`, `"72"`, `"1,000"` and a full GSM8K solution ending in `#### 72` all work."""
    text = str(ground_truth)
    if "####" in text:
        text = text.split("####")[-1]
    return text.strip().replace(",", "").replace("$", "")


def gsm8k_score(response: str, ground_truth: Any, method: str = "strict", format_score: float = 0.0,
                score: float = 1.0) -> float:
    answer = extract_solution(response, method)
    if answer is None:
        return 0.0
    return score if answer == normalize_ground_truth(ground_truth) else format_score


@register_reward("gsm8k", "openai/gsm8k")
def gsm8k_reward(response: str, sample: dict, method: str = "strict", format_score: float = 0.0,
                 score: float = 1.0) -> float:
    return gsm8k_score(response, sample["ground_truth"], method, format_score, score)


@register_reward("quickstart")
def quickstart_reward(response: str, sample: dict, format_score: float = 0.2, score: float = 1.0) -> float:
    """Single-digit addition for the CPU quickstart: partial credit for `#### <number>`,
    full credit for the right number. The partial credit gives a tiny policy a signal
    in its first few steps, before it ever gets the sum right."""
    answer = extract_solution(response, "strict")
    if answer is None:
        return 0.0
    answer = answer.rstrip(".")      # "#### 7." counts as 7
    return score if answer == normalize_ground_truth(sample["ground_truth"]) else format_score
