"""Reward of the synthetic image-QA task (`tools/make_image_qa_data.py`): the first answer
word of the response (a number, digits or words, or a colour) must be the ground truth.

Only the first candidate counts, so listing every colour or number is not an answer.
    reward: {name: image_qa}
"""
from __future__ import annotations

import re
from typing import Any

from megatron_rl.rewards.registry import register_reward

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9"}
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")


def first_answer(response: str) -> str | None:
    """The first number or colour word of the response, numbers as digits."""
    for word in re.findall(r"[a-z]+|\d+", response.lower()):
        if word.isdigit():
            return str(int(word))
        if word in NUMBER_WORDS:
            return NUMBER_WORDS[word]
        if word in COLOURS:
            return word
    return None


@register_reward("image_qa")
def image_qa_reward(response: str, sample: dict[str, Any]) -> float:
    if "ground_truth" not in sample:
        raise KeyError(f"sample {sample.get('uid', '?')} has no 'ground_truth'")
    truth = str(sample["ground_truth"]).strip().lower()
    truth = NUMBER_WORDS.get(truth, truth)
    return float(first_answer(response) == truth)
