"""`reward.name: verl_default`: verl's default scorer (`verl.utils.reward_score.default_compute_score`)
for the data sources we have rules for, dispatched by the sample's `data_source`:

    openai/gsm8k                                        -> gsm8k (strict `#### n`)
    lighteval/MATH, DigitalLearningGmbH/MATH-lighteval,
    HuggingFaceH4/MATH-500                              -> math (last \\boxed{})
    math_dapo, aime*                                    -> math_dapo (+1/-1, `acc`)
    searchR1_{nq,triviaqa,popqa,hotpotqa,
              2wikimultihopqa,musique,bamboogle}        -> qa_em (`<answer>` exact match)

Any other source (verl's prime math, code sandboxes, geometry3k, ...) is an error that
names it (`check_source`, called by the manager before scoring), not a silent zero.
One difference from verl: our responses exclude the prompt, so search QA takes the last
`<answer>` of the response (verl skips the first match, which is the prompt's example).
"""
from __future__ import annotations

from typing import Any

from megatron_rl.rewards.dapo import dapo_math_score
from megatron_rl.rewards.gsm8k import gsm8k_score
from megatron_rl.rewards.math_boxed import boxed_score
from megatron_rl.rewards.qa import qa_exact_match
from megatron_rl.rewards.registry import register_reward

NAME = "verl_default"
MATH_SOURCES = ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")
SEARCH_SOURCES = tuple(f"searchR1_{s}" for s in
                       ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle"))
KNOWN = ("openai/gsm8k", *MATH_SOURCES, "math_dapo", "aime*", *SEARCH_SOURCES)


def rule_of(data_source: str | None) -> str | None:
    """The rule verl's default scorer applies to `data_source`, or None when we have none."""
    if data_source == "openai/gsm8k":
        return "gsm8k"
    if data_source in MATH_SOURCES:
        return "math"
    if data_source == "math_dapo" or (data_source or "").startswith("aime"):
        return "math_dapo"
    if data_source in SEARCH_SOURCES:
        return "qa_em"
    return None


def check_source(data_source: str | None, uid: str = "?") -> None:
    if rule_of(data_source) is None:
        raise ValueError(f"sample {uid}: reward.name=verl_default has no rule for data_source {data_source!r}; "
                         f"it scores {list(KNOWN)}. Pass verl's scorer for it through reward.custom_functions "
                         f"(a compute_score(data_source, solution_str, ground_truth, extra_info) works as is)")


@register_reward(NAME)
def verl_default_reward(response: str, sample: dict) -> Any:
    source = sample.get("data_source")
    rule = rule_of(source)
    if rule is None:
        check_source(source, sample.get("uid", "?"))
    truth = sample.get("ground_truth")
    if rule == "gsm8k":
        return gsm8k_score(response, truth)
    if rule == "math":
        return boxed_score(response, truth)
    if rule == "math_dapo":
        return dapo_math_score(response, truth)
    return qa_exact_match(response, truth)
