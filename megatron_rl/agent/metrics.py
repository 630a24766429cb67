"""Agent metrics from the per-sample records `AgentRolloutEngine` writes.

`agent/turns_mean` and `agent/finished_frac` (share of samples that gave an
`<answer>`) are means over samples; `agent/search_calls` (tool calls of any tool),
`agent/tool_errors` and `agent/invalid_actions` are totals over the batch.
"""
from __future__ import annotations


def agent_metrics(samples: list[dict]) -> dict[str, float]:
    if not samples:
        return {}
    n = len(samples)
    return {
        "agent/turns_mean": sum(s["n_turns"] for s in samples) / n,
        "agent/search_calls": float(sum(s["n_tool_calls"] for s in samples)),
        "agent/tool_errors": float(sum(s["n_tool_errors"] for s in samples)),
        "agent/invalid_actions": float(sum(s["n_invalid_actions"] for s in samples)),
        "agent/finished_frac": sum(bool(s["finished"]) for s in samples) / n,
        "agent/response_length_mean": sum(s["response_length"] for s in samples) / n,
    }
