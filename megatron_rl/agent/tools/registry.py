"""Tool registry: `@register_tool("name")` on a class built from `AgentConfig`.

A tool answers a batch of queries at once (one HTTP request for all samples that
searched in a turn): `batch_call(list[str]) -> list[str]`, same length and order.
A tool that fails returns `ToolFailure` strings instead of raising, so one broken
server or one bad expression costs an error observation, never the run.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

TOOLS: dict[str, Callable] = {}


@runtime_checkable
class Tool(Protocol):
    def batch_call(self, queries: list[str]) -> list[str]: ...


class ToolFailure(str):
    """An observation that reports a failure (still shown to the policy, counted as
    `agent/tool_errors`). A `str`, so tools keep the plain list-of-strings interface."""


def is_failure(observation: str) -> bool:
    return isinstance(observation, ToolFailure)


def register_tool(name: str):
    def deco(factory):
        if name in TOOLS:
            raise ValueError(f"tool '{name}' is already registered (by {TOOLS[name]})")
        TOOLS[name] = factory
        return factory
    return deco


def build_tool(name: str, config) -> Tool:
    """The tool `name` built from an `AgentConfig` (its factory reads what it needs)."""
    if name not in TOOLS:
        raise KeyError(f"agent.tools: unknown tool '{name}'; registered: {sorted(TOOLS)}")
    return TOOLS[name](config)


def build_tools(config) -> dict[str, Tool]:
    return {name: build_tool(name, config) for name in config.tools}
