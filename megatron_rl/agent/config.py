"""The `agent:` config section (multi-turn tool loop around a rollout engine)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AgentConfig:
    # Loop: the policy writes `<tool>query</tool>` (tool in `tools`) or `<answer>...</answer>`.
    # At most `max_turns` turns execute tools; one more turn follows without tools. Per-turn
    # generation is capped by `rollout.max_new_tokens`; the whole response (generated plus
    # injected tokens) by `max_response_length`, past which it is truncated and finished.
    enable: bool = False
    max_turns: int = 2
    max_response_length: int = 1024
    tools: list[str] = field(default_factory=lambda: ["search"])

    # Injection: each tool result is wrapped as `\n\n<information>...</information>\n\n`, its
    # content cut to `max_obs_length` tokens. With `state_masking` (the default) injected tokens
    # get response_mask 0 so the policy is never trained to predict retrieved text.
    max_obs_length: int = 512
    state_masking: bool = True

    # Retriever (`search` tool): a `megatron-rl serve-retriever` endpoint. A call that fails
    # after `retries` retries (exponential backoff from `backoff_s`) yields an error
    # observation and counts in `agent/tool_errors`; the run goes on.
    retriever_url: str = "http://127.0.0.1:8000/retrieve"
    topk: int = 3
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5

    # Sandboxed tools: `python` runs code in `python -I -S` inside an OS sandbox
    # (agent/tools/sandbox.py: no network, read-only but for its temp dir) with these limits; every tool's
    # observation is cut to `max_tool_output_chars` characters before tokenization.
    python_timeout_s: float = 5.0
    python_memory_mb: int = 512
    max_tool_output_chars: int = 2000
    # No OS sandbox on the machine (bubblewrap / unprivileged unshare): the python tool refuses to
    # start unless this is true (then it runs with the limits above only: network and files reachable).
    allow_unsandboxed_python: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tools, str):
            self.tools = [self.tools]
        for key in ("max_turns", "topk", "retries"):
            if getattr(self, key) < 0:
                raise ValueError(f"agent.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("max_response_length", "max_obs_length", "max_tool_output_chars"):
            if getattr(self, key) <= 0:
                raise ValueError(f"agent.{key} must be positive, got {getattr(self, key)}")
        if "answer" in self.tools:
            raise ValueError("agent.tools must not contain 'answer': it is the reserved final action")
