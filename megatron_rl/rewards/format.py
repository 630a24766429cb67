"""Format reward: `score` when the whole (stripped) response matches a regex from the
config (`reward.format_pattern`, `.` matching newlines), else 0."""
from __future__ import annotations

import functools
import re

from megatron_rl.rewards.registry import register_reward

DEFAULT_PATTERN = r"^<think>.*</think>\s*<answer>.*</answer>$"


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def format_score(response: str, pattern: str = DEFAULT_PATTERN, score: float = 1.0) -> float:
    return score if _compiled(pattern).match(response.strip()) else 0.0


@register_reward("format")
def format_reward(response: str, sample: dict, pattern: str = DEFAULT_PATTERN, score: float = 1.0) -> float:
    return format_score(response, pattern, score)
