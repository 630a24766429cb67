"""Tools the agent loop can call: a registry by name plus the built-in tools.

Importing this package registers `search`, `calculator` and `python`.
"""
from megatron_rl.agent.tools.registry import (TOOLS, Tool, ToolFailure, build_tool, build_tools,
                                              is_failure, register_tool)
from megatron_rl.agent.tools import calculator, python_exec, search  # noqa: F401  (registers)
from megatron_rl.agent.tools.search import RetrieverClient, format_documents

__all__ = ["TOOLS", "Tool", "ToolFailure", "build_tool", "build_tools", "is_failure", "register_tool",
           "RetrieverClient", "format_documents"]
