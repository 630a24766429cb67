"""Fixtures shared by the vLLM engine tests (no vLLM needed)."""
import sys
import types

import pytest


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module: `SamplingParams(**kw)` keeps its keywords; tests add `LLM`."""
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: types.SimpleNamespace(kw=kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod
