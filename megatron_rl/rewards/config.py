"""The `reward:` config section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_rl.rewards.format import DEFAULT_PATTERN


@dataclass
class OverlongConfig:
    # DAPO's soft overlong punishment on training rewards: responses longer than
    # rollout.max_new_tokens - buffer_len lose up to penalty_factor, linearly (rewards/dapo.py).
    buffer_len: int = 0                     # 0: off
    penalty_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.buffer_len < 0:
            raise ValueError(f"reward.overlong.buffer_len must be >= 0 (0: off), got {self.buffer_len}")
        if self.penalty_factor < 0:
            raise ValueError(f"reward.overlong.penalty_factor must be >= 0, got {self.penalty_factor}")


@dataclass
class RewardModelConfig:
    # A sequence-classification reward model (rewards/reward_model.py), a frozen role.
    path: str = ""                          # HF *ForSequenceClassification dir; "" : no reward model
    micro_batch_size: int = 4
    offload: bool = False                   # weights in host memory between passes (GPU only)
    # How prompt + response reach it: tokens (the policy's ids as they are), chat (its own
    # chat template over the messages + an assistant turn), text (the policy's rendered
    # prompt text + response, its tokenizer); auto: tokens when the tokenizers agree, else chat.
    template: str = "auto"                  # auto | tokens | chat | text
    normalize: str = "none"                 # none | batch (z-score over the step's model-scored rows, all DP ranks)

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0:
            raise ValueError(f"reward.model.micro_batch_size must be > 0, got {self.micro_batch_size}")
        if self.template not in ("auto", "tokens", "chat", "text"):
            raise ValueError(f"reward.model.template must be auto|tokens|chat|text, got {self.template!r}")
        if self.normalize not in ("none", "batch"):
            raise ValueError(f"reward.model.normalize must be none|batch, got {self.normalize!r}")


@dataclass
class JudgeConfig:
    # An LLM judge behind an OpenAI-compatible /v1/chat/completions (rewards/judge.py).
    url: str = ""                           # e.g. http://127.0.0.1:8000 ; "" : no judge
    model: str = "default"
    prompt_template: str = ""               # Jinja file; sees prompt, response, sample; "" : built-in
    parse: str = "regex:(-?\\d+(?:\\.\\d+)?)"   # regex:<pattern> (group 1, else the match) | json:<field>
    max_concurrency: int = 8
    timeout_s: float = 30.0                 # per HTTP attempt
    retries: int = 2                        # extra attempts after a failed one, with exponential backoff
    backoff_s: float = 0.5
    fallback: float = 0.0                   # score of a row whose every attempt failed
    max_tokens: int = 64
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"reward.judge.max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward.judge.timeout_s must be positive, got {self.timeout_s}")
        if self.retries < 0:
            raise ValueError(f"reward.judge.retries must be >= 0, got {self.retries}")
        if not self.parse.startswith(("regex:", "json:")):
            raise ValueError(f"reward.judge.parse must be 'regex:<pattern>' or 'json:<field>', got {self.parse!r}")


@dataclass
class RewardConfig:
    # Which reward scores a sample: `name` for every sample, or, with
    # `select_by_data_source`, the sample's `data_source` looked up in
    # `data_source_map` (source -> reward name) and then in the registry;
    # samples without a data_source use `name`, an unknown source is an error.
    name: str = "gsm8k"
    select_by_data_source: bool = False
    data_source_map: dict[str, str] = field(default_factory=dict)

    # User rewards: reward name -> "pkg.module:function" or "path/to/file.py:function";
    # registered under that name (usable in `name` and `data_source_map`).
    custom_functions: dict[str, str] = field(default_factory=dict)
    # Keyword arguments per reward name, e.g. {gsm8k: {method: flexible, format_score: 0.1}}.
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The `format` reward's regex (whole stripped response, `.` matches newlines).
    format_pattern: str = DEFAULT_PATTERN

    # Execution: `thread` suits fast rule rewards; `process` isolates slow or crashy ones
    # (a timed-out process worker is killed; a timed-out thread runs on, abandoned).
    # num_workers 0 scores inline in the caller, without timeouts.
    executor: str = "thread"                 # thread | process
    num_workers: int = 4
    mp_start_method: str = "spawn"          # for executor=process
    timeout_s: float = 30.0                 # per call
    fallback_score: float = 0.0             # score of a failed or timed-out call

    # Model-based rewards and how components add up (rewards/combine.py): with `combine`
    # empty a row gets one reward (its `reward_model.style: model` -> the reward model, or
    # the judge when there is no reward model; else its rule); with `combine`, every row
    # gets sum(weight * component) over {rule name | model | judge: weight}.
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    combine: dict[str, float] = field(default_factory=dict)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)

    def __post_init__(self) -> None:
        if self.executor not in ("thread", "process"):
            raise ValueError(f"reward.executor must be thread|process, got '{self.executor}'")
        if self.num_workers < 0:
            raise ValueError(f"reward.num_workers must be >= 0, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be positive, got {self.timeout_s}")
