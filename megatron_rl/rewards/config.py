"""The `reward:` config section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_rl.rewards.format import DEFAULT_PATTERN


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

    def __post_init__(self) -> None:
        if self.executor not in ("thread", "process"):
            raise ValueError(f"reward.executor must be thread|process, got '{self.executor}'")
        if self.num_workers < 0:
            raise ValueError(f"reward.num_workers must be >= 0, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be positive, got {self.timeout_s}")
