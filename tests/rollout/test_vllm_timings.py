"""The vLLM engine's per-generate split (issue #20): wake, generate, outputs_to_batch and sleep
wall times in `last_metrics` (what tools/bench_e2e.py reports under `rollout_split`)."""
import time

from megatron_rl.rollout.protocol import SamplingParams
from tests.rollout.test_rollout_vllm_engine import _engine, _prompts

SPLIT = ("perf/vllm_wake_s", "perf/vllm_generate_s", "perf/vllm_outputs_s", "perf/vllm_sleep_s")


def _slow(llm, name, seconds):
    real = getattr(llm, name)
    setattr(llm, name, lambda *a, **kw: time.sleep(seconds) or real(*a, **kw))


def test_rollout_vllm_generate_logs_its_split_and_each_part_is_timed_where_it_runs(fake_vllm):
    eng = _engine(sleep_level=1)
    eng.state = "asleep"                       # the wake really wakes vLLM
    _slow(eng.llm, "wake_up", 0.02)
    _slow(eng.llm, "generate", 0.05)
    _slow(eng.llm, "sleep", 0.03)
    eng.generate(_prompts(), SamplingParams(n=2, max_new_tokens=3))
    m = eng.last_metrics
    assert all(m[k] >= 0.0 for k in SPLIT)
    assert m["perf/vllm_wake_s"] >= 0.02 and m["perf/vllm_generate_s"] >= 0.05 and m["perf/vllm_sleep_s"] >= 0.03
    assert m["perf/vllm_outputs_s"] < 0.02      # the fakes' sleeps land in their own parts only
    assert eng.llm.calls[-1] == ("sleep", 1)


def test_rollout_vllm_split_without_sleep_mode_logs_zero_sleep(fake_vllm):
    eng = _engine(sleep_level=0)
    eng.generate(_prompts(), SamplingParams(max_new_tokens=2))
    assert set(SPLIT) <= set(eng.last_metrics) and eng.last_metrics["perf/vllm_sleep_s"] < 0.01
    assert all(c[0] != "sleep" for c in eng.llm.calls)
