"""Reward of the document-QA demo task (`tools/make_doc_qa_data.py`): is the answer,
which the prompt's document states, in the response, and no other candidate?

    reward:
      name: doc_qa
      custom_functions: {doc_qa: "megatron_rl.token_weights.doc_qa:doc_qa_reward"}
"""
from __future__ import annotations

import re
from typing import Any


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word.lower())}\b", text.lower()) is not None


def doc_qa_reward(response: str, sample: dict[str, Any]) -> float:
    """1.0: the answer and no distractor; 0.5: the answer among distractors (a list of
    every candidate is not an answer); 0.0: no answer."""
    if "ground_truth" not in sample:
        raise KeyError(f"sample {sample.get('uid', '?')} has no 'ground_truth'")
    if not _mentions(response, str(sample["ground_truth"])):
        return 0.0
    if any(_mentions(response, d) for d in sample.get("distractors", [])):
        return 0.5
    return 1.0
