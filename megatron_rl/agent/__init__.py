"""Search-R1-style agent rollouts: a tool loop around any rollout engine, a tool
registry (search, calculator, python), a BM25 retriever server and its client,
state masking of injected tokens, the `search_qa` reward and agent metrics.

Names load lazily so `python -m megatron_rl.agent.retriever_server` stays free of torch.
"""
import importlib

_EXPORTS = {
    "AgentConfig": "megatron_rl.agent.config",
    "AgentRolloutEngine": "megatron_rl.agent.engine",
    "agent_metrics": "megatron_rl.agent.metrics",
    **{name: "megatron_rl.agent.tools" for name in
       ("TOOLS", "RetrieverClient", "ToolFailure", "build_tool", "build_tools", "is_failure", "register_tool")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_rl.agent' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
