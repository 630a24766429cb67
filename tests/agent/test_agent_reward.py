"""`search_qa` reward: SQuAD-normalised exact match of the policy's own final answer."""
from __future__ import annotations

import pytest

from megatron_rl.agent.reward import search_qa_reward, search_qa_score
from megatron_rl.rewards import get_reward


@pytest.mark.parametrize("response,targets,score", [
    ("<answer> The Kelmar. </answer>", ["kelmar"], 1.0),
    ("<answer>Paris</answer> then <answer>Lake Ostrel</answer>", ["Ostrel", "lake ostrel"], 1.0),
    ("<answer>Lake Geneva</answer>", "Lake Ostrel", 0.0),
    ("no tags at all", ["x"], 0.0),
])
def test_exact_match_on_last_answer(response, targets, score):
    assert search_qa_score(response, targets) == score


def test_format_score_only_for_a_wrong_but_present_answer():
    assert search_qa_score("<answer>no</answer>", ["yes"], format_score=0.2) == 0.2
    assert search_qa_score("none", ["yes"], format_score=0.2) == 0.0


def test_agent_sample_answer_wins_over_tags_in_retrieved_text():
    text = "<search>q</search><information><answer>Kelmar</answer></information>"
    assert search_qa_reward(text, {"ground_truth": ["Kelmar"], "finished": False, "answer": None}) == 0.0
    assert search_qa_reward(text, {"ground_truth": ["Kelmar"]}) == 1.0          # plain samples: last tag


def test_registered_as_search_qa_and_names_missing_ground_truth():
    assert get_reward("search_qa") is search_qa_reward
    with pytest.raises(KeyError, match="sample u7 has no 'ground_truth'"):
        search_qa_reward("<answer>x</answer>", {"uid": "u7"})
