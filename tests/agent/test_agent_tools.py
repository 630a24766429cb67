"""Tool registry, calculator, python sandbox, retriever client failure handling."""
from __future__ import annotations

import time

import pytest

from megatron_rl.agent import AgentConfig, TOOLS, ToolFailure, build_tools, is_failure, register_tool
from megatron_rl.agent.actions import parse_action, stop_strings
from megatron_rl.agent.tools import RetrieverClient
from megatron_rl.agent.tools.calculator import Calculator
from megatron_rl.agent.tools.python_exec import PythonExec


def test_registry_builds_configured_tools_and_names_unknown_ones():
    tools = build_tools(AgentConfig(tools=["search", "calculator"]))
    assert sorted(tools) == ["calculator", "search"]
    with pytest.raises(KeyError, match="unknown tool 'wiki'.*calculator"):
        build_tools(AgentConfig(tools=["wiki"]))


def test_registering_a_tool_twice_is_an_error():
    with pytest.raises(ValueError, match="'search' is already registered"):
        register_tool("search")(object)


def test_parse_action_takes_first_complete_tag_of_known_tools():
    assert parse_action("x <calculator> 2+2 </calculator> <answer>4</answer>", ["calculator"]).content == "2+2"
    assert parse_action("<search>a</answer>", ["search"]) is None
    assert parse_action("<wiki>a</wiki>", ["search"]) is None
    assert parse_action("<answer>\nKel mar\n</answer>", []).content == "Kel mar"
    assert stop_strings(["search"]) == ["</search>", "</answer>"]


def test_calculator_evaluates_arithmetic():
    assert Calculator().batch_call(["2 + 3 * 4", "(1 - 7) / 4", "2 ** 10", "-3 // 2", "7 % 4"]) == \
        ["14", "-1.5", "1024", "-2", "3"]


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "x + 1", "9 ** 9 ** 9", "1 / 0",
                                  "[1, 2]", "(-1) ** 0.5", "open('f')"])
def test_calculator_refuses_anything_but_numbers_and_operators(expr):
    (out,) = Calculator().batch_call([expr])
    assert is_failure(out) and out.startswith("calculator error:")


def test_python_tool_returns_stdout_in_order():
    tool = PythonExec(AgentConfig(python_timeout_s=5))
    assert tool.batch_call(["print(6 * 7)", "import sys; print(sys.flags.isolated, sys.flags.no_site)"]) == \
        ["42\n", "1 1\n"]


def test_python_tool_kills_code_past_the_wall_time():
    t0 = time.perf_counter()
    (out,) = PythonExec(AgentConfig(python_timeout_s=0.5)).batch_call(["while True: pass"])
    assert is_failure(out) and "timed out" in out and time.perf_counter() - t0 < 3


def test_python_tool_memory_limit_and_errors_are_failures():
    tool = PythonExec(AgentConfig(python_memory_mb=64))
    big, err = tool.batch_call(["x = bytearray(512 * 2**20)", "raise KeyError('k')"])
    assert is_failure(big) and "MemoryError" in big
    assert is_failure(err) and "KeyError" in err


def test_python_tool_truncates_output():
    (out,) = PythonExec(AgentConfig(max_tool_output_chars=10)).batch_call(["print('a' * 100)"])
    assert out == "a" * 10 + "...[truncated]"


def test_python_tool_sees_no_environment_or_cwd_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("hi")
    (out,) = PythonExec().batch_call(["import os; print('SECRET_TOKEN' in os.environ, os.listdir('.'))"])
    assert out == "False []\n"


def test_client_without_server_returns_error_observations_after_retries():
    client = RetrieverClient("http://127.0.0.1:9/retrieve", timeout_s=0.5, retries=2, backoff_s=0.01)
    t0 = time.perf_counter()
    out = client.batch_call(["a", "b"])
    assert [is_failure(o) for o in out] == [True, True] and client.errors == 1
    assert "after 3 attempts" in out[0]
    assert time.perf_counter() - t0 >= 0.03         # backoff 0.01 + 0.02


def test_tool_that_raises_becomes_error_observations(tokenizer):
    from megatron_rl.agent import AgentRolloutEngine
    from megatron_rl.rollout.protocol import SamplingParams
    from tests.agent.conftest import ScriptedEngine, prompt_batch

    class Broken:
        def batch_call(self, queries):
            raise RuntimeError("boom")

    agent = AgentRolloutEngine(ScriptedEngine(tokenizer, {"a": ["<search>x</search>", "<answer>y</answer>"]}),
                               tokenizer, AgentConfig(max_turns=1), tools={"search": Broken()})
    out = agent.generate(prompt_batch(tokenizer, {"a": "q"}), SamplingParams())
    assert out.samples[0]["turns"][0]["observation"] == "search error: RuntimeError: boom"
    assert out.samples[0]["answer"] == "y" and agent.last_metrics["agent/tool_errors"] == 1.0


def test_tool_failure_is_a_plain_string():
    assert isinstance(ToolFailure("x"), str) and not is_failure("x") and "search" in TOOLS
