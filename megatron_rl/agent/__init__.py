"""Search-R1-style agent rollouts: a tool loop around any rollout engine, a tool
registry (search, calculator, python), a BM25 retriever server and its client,
state masking of injected tokens, the `search_qa` reward and agent metrics."""
from megatron_rl.agent.config import AgentConfig
from megatron_rl.agent.engine import AgentRolloutEngine
from megatron_rl.agent.metrics import agent_metrics
from megatron_rl.agent.tools import (TOOLS, RetrieverClient, ToolFailure, build_tool, build_tools,
                                     is_failure, register_tool)

__all__ = ["AgentConfig", "AgentRolloutEngine", "RetrieverClient", "TOOLS", "ToolFailure",
           "agent_metrics", "build_tool", "build_tools", "is_failure", "register_tool"]
