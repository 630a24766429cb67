"""Rewards: a registry of rule rewards, user functions by path, and a `RewardManager`
that scores responses on a worker pool with timeouts and fallbacks.

Built-in names: gsm8k (openai/gsm8k), quickstart, math (boxed), qa_em (nq, hotpotqa,
triviaqa), format, math_dapo (DAPO's `Answer:` rule), verl_default (verl's scorer by data_source), image_qa
(tools/make_image_qa_data.py). Add one with `@register_reward("name")` or
`reward.custom_functions: {name: "path/to/file.py:function"}`.
"""
from megatron_rl.rewards.registry import REWARDS, call_reward, get_reward, register_reward
from megatron_rl.rewards import format as _format, gsm8k as _gsm8k, math_boxed as _math_boxed, qa as _qa  # noqa: F401  (register)
from megatron_rl.rewards import dapo as _dapo, verl_default as _verl_default  # noqa: F401  (register)
from megatron_rl.rewards import image_qa as _image_qa  # noqa: F401  (register)
from megatron_rl.rewards.config import RewardConfig
from megatron_rl.rewards.loader import load_function
from megatron_rl.rewards.manager import RewardManager, RewardResult
from megatron_rl.rewards.qa import normalize_answer, qa_exact_match
from megatron_rl.rewards.token_rewards import to_token_rewards

__all__ = ["REWARDS", "RewardConfig", "RewardManager", "RewardResult", "call_reward", "get_reward",
           "load_function", "normalize_answer", "qa_exact_match", "register_reward", "to_token_rewards"]
