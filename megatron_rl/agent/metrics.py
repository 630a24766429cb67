"""Agent metrics from the per-sample records `AgentRolloutEngine` writes.

`agent/turns_mean` and `agent/finished_frac` (share of samples that gave an
`<answer>`) are means over samples; `agent/search_calls` (tool calls of any tool),
`agent/tool_errors` and `agent/invalid_actions` are totals over the batch.
"""
from __future__ import annotations

from megatron_rl.logging.values import MeanOver, Summed


def agent_metrics(samples: list[dict]) -> dict[str, float]:
    """Means carry their sample count and totals are `Summed`, so that under data
    parallelism `reduce_metrics` gives the global batch's (not a mean of rank totals)."""
    if not samples:
        return {}
    n = len(samples)
    return {
        "agent/turns_mean": MeanOver(sum(s["n_turns"] for s in samples) / n, n),
        "agent/search_calls": Summed(sum(s["n_tool_calls"] for s in samples)),
        "agent/tool_errors": Summed(sum(s["n_tool_errors"] for s in samples)),
        "agent/invalid_actions": Summed(sum(s["n_invalid_actions"] for s in samples)),
        "agent/finished_frac": MeanOver(sum(bool(s["finished"]) for s in samples) / n, n),
        "agent/response_length_mean": MeanOver(sum(s["response_length"] for s in samples) / n, n),
    }
