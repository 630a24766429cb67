"""The LLM judge end to end against `megatron-rl serve` (a tiny random Llama on CPU): the
concurrency bound holds, a timeout and a malformed reply each become a counted fallback,
and a server that goes away and comes back is survived."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from megatron_rl.rewards.config import JudgeConfig
from megatron_rl.rewards.judge import Judge
from tests.helpers import make_tiny_hf
from tests.trainer.conftest import write_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "serve", "--model", model, "--port", str(port)],
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(f"megatron-rl serve exited with {proc.returncode}")
        try:
            return proc if health(port)["status"] == "ok" else proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("megatron-rl serve did not come up in 120 s")


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


ROWS = [{"uid": f"r{i}", "prompt_text": "what is two plus two ?"} for i in range(6)]
RESPONSES = ["4", "four", "yes", "2 plus 2", "no", "4 4"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny random Llama; `MRL_JUDGE_MODEL=DIR` serves that model instead (e.g. the demo
    SmolLM2-135M-Instruct, `python tools/fetch_demo_model.py`) for the manual run."""
    model = os.environ.get("MRL_JUDGE_MODEL")
    if not model:
        d = tmp_path_factory.mktemp("serve")
        model = make_tiny_hf(d / "model", "llama", tie=True)
        write_tokenizer(model)
    port = free_port()
    proc = start(model, port)
    yield model, port, proc
    stop(proc)


def judge(port: int, **kw) -> Judge:
    base = dict(url=f"http://127.0.0.1:{port}", parse="regex:(\\d)", max_concurrency=2, timeout_s=20.0, retries=0,
                backoff_s=0.05, fallback=-1.0, max_tokens=48, temperature=0.0)
    return Judge(JudgeConfig(**{**base, **kw}))


@pytest.mark.multiproc
def test_judge_against_served_model(server):
    model, port, proc = server
    before = health(port)["requests"]
    scores, m = judge(port).score(RESPONSES, ROWS)
    h = health(port)
    assert h["requests"] - before == len(ROWS)
    assert 1 <= h["max_inflight"] <= 2                            # max_concurrency=2
    assert m["reward/judge_unreachable"] == 0 and m["reward/judge_timeout"] == 0
    assert m["reward/judge_failures"] == m["reward/judge_parse_error"]
    assert sum(s != -1.0 for s in scores) == len(ROWS) - m["reward/judge_failures"]

    # a malformed reply (no 'SCORE=' in a random model's words): fallback, counted
    scores, m = judge(port, parse="regex:SCORE=(\\d+)", retries=1).score(RESPONSES[:2], ROWS[:2])
    assert scores == [-1.0, -1.0] and m["reward/judge_parse_error"] == 2 and m["reward/judge_attempts"] == 4

    # a timeout: fallback, counted, and the call returns
    t0 = time.monotonic()
    scores, m = judge(port, timeout_s=0.001).score(RESPONSES[:2], ROWS[:2])
    assert scores == [-1.0, -1.0] and m["reward/judge_timeout"] == 2
    assert time.monotonic() - t0 < 10

    # the server goes away: every row falls back (unreachable), quickly
    stop(proc)
    scores, m = judge(port, retries=1).score(RESPONSES, ROWS)
    assert scores == [-1.0] * len(ROWS) and m["reward/judge_unreachable"] == len(ROWS)
    # ... and comes back on the same port: scored again
    server_again = start(model, port)
    try:
        scores, m = judge(port).score(RESPONSES, ROWS)
        assert m["reward/judge_unreachable"] == 0 and m["reward/judge_timeout"] == 0
        assert health(port)["requests"] == len(ROWS)
    finally:
        stop(server_again)
