"""`search_qa` reward: exact match of the policy's final answer against any target.

Uses the rewards package's SQuAD normalisation (`megatron_rl.rewards.qa`). When the
sample comes from `AgentRolloutEngine` its `answer` field (parsed from the policy's
own turn) is used, so an `<answer>` tag inside retrieved text can never score;
otherwise the last `<answer>` of the response. As in Search-R1, a well-formed but
wrong answer earns `format_score` (0 by default), a missing one 0.
"""
from __future__ import annotations

from typing import Any

from megatron_rl.rewards.qa import qa_exact_match
from megatron_rl.rewards.registry import register_reward

from megatron_rl.agent.actions import last_answer


def search_qa_score(response: str, ground_truth: Any, answer: str | None = None,
                    format_score: float = 0.0) -> float:
    if answer is None:
        answer = last_answer(response)
    if answer is None:
        return 0.0
    if qa_exact_match(f"<answer>{answer}</answer>", ground_truth) == 1.0:
        return 1.0
    return float(format_score)


@register_reward("search_qa")
def search_qa_reward(response: str, sample: dict, format_score: float = 0.0) -> float:
    if "ground_truth" not in sample:
        raise KeyError(f"search_qa reward: sample {sample.get('uid', '?')} has no 'ground_truth'; "
                       f"it has {sorted(sample)}")
    answer = sample["answer"] if "finished" in sample else None
    if "finished" in sample and answer is None:
        return 0.0
    return search_qa_score(response, sample["ground_truth"], answer, format_score)
