"""Rollout seeds: rollout.vllm.per_request_seed (true by default: one seed per prompt; false:
vLLM's engine generator, the device generator left alone), the step's seed per DP rank for every
engine (trainer/phases.py `rollout_seed`), and torch's cache released before every vLLM wake."""
import dataclasses

import pytest
import torch

from megatron_rl.config.schema import Config
from megatron_rl.rollout import vllm_device
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.vllm_config import VLLMConfig
from megatron_rl.rollout.vllm_convert import request_seeds
from megatron_rl.trainer import phases
from tests.rollout.test_rollout_vllm_engine import _engine, _prompts


class FakeCuda:
    """The few torch.cuda calls the engine may make, recorded in order."""

    def __init__(self, monkeypatch, reserved=(6 * 2 ** 30, 2 ** 30), free=8 * 2 ** 30, total=80 * 2 ** 30):
        self.calls, self.reserved, self.free, self.total = [], list(reserved), free, total
        for name, fn in [("is_available", lambda: True), ("current_device", lambda: 0),
                         ("get_rng_state", lambda d=0: self.calls.append(("get_rng", d)) or "trainer-state"),
                         ("manual_seed", lambda s: self.calls.append(("seed", s))),
                         ("set_rng_state", lambda st, d=0: self.calls.append(("set_rng", st, d))),
                         ("memory_reserved", lambda: self.reserved.pop(0) if len(self.reserved) > 1 else self.reserved[0]),
                         ("mem_get_info", lambda d=None: (self.free, self.total)),
                         ("empty_cache", lambda: self.calls.append(("empty_cache",)))]:
            monkeypatch.setattr(torch.cuda, name, fn)


def _sent(eng):
    seen = []
    real = eng.llm.generate

    def generate(prompts, params, use_tqdm=False):
        seen.extend(p.kw["seed"] for p in params)
        return real(prompts, params)
    eng.llm.generate = generate
    return seen


def test_rollout_vllm_per_request_seed_is_the_default():
    assert VLLMConfig().per_request_seed is True and Config().rollout.vllm.per_request_seed is True


@pytest.mark.parametrize("per_request", [False, True])
def test_rollout_vllm_per_request_seed_setting(fake_vllm, monkeypatch, per_request):
    cuda = FakeCuda(monkeypatch)
    eng = _engine(sleep_level=0, per_request_seed=per_request, seed=3)
    seen = _sent(eng)
    eng.generate(_prompts(), SamplingParams(n=2, max_new_tokens=2, seed=100))
    # True: one seed per prompt, room for its n children; False: none (vLLM's engine generator).
    assert seen == (request_seeds(SamplingParams(n=2, seed=100), 3) if per_request else [None, None, None])
    assert not [c for c in cuda.calls if c[0] != "empty_cache"]      # the device generator is never touched


def test_rollout_seed_differs_by_dp_rank_only():
    seeds = {phases.rollout_seed(42, step, dp) for step in range(4) for dp in range(3)}
    assert len(seeds) == 12
    assert phases.rollout_seed(42, 7, 2) == phases.rollout_seed(42, 7, 2)      # TP/PP/EP peers of DP rank 2
    assert phases.rollout_seed(42, 7, 0) == 42 * 100003 + 7                    # DP rank 0 = a DP=1 run's seed
    assert phases.rollout_seed(42, 0, 1, validation=True) != phases.rollout_seed(42, 0, 0, validation=True)


def test_rollout_request_seeds_of_two_dp_ranks_never_meet():
    """vLLM's per-prompt seeds (+ dynamic-sampling rounds) over a run: disjoint between DP ranks."""
    sp = lambda step, dp, rnd: SamplingParams(n=16, seed=phases.rollout_seed(1234, step, dp) + 1_000_003 * rnd)
    per_dp = [{s for step in range(200) for rnd in range(3) for s in request_seeds(sp(step, dp, rnd), 512)}
              for dp in range(2)]
    assert not per_dp[0] & per_dp[1]


@pytest.mark.parametrize("validation", [False, True])
def test_sampling_params_seed_is_this_dp_ranks(monkeypatch, validation):
    """Every engine gets its seed here: two DP ranks differ, two peers of one DP rank agree."""
    cfg = Config()
    seed_on = lambda dp: (monkeypatch.setattr(phases, "dp_rank_size", lambda: (dp, 2)),
                          phases.sampling_params(cfg, 3, validation=validation).seed)[1]
    assert seed_on(0) != seed_on(1) and seed_on(1) == seed_on(1)
    assert seed_on(1) == phases.rollout_seed(cfg.trainer.seed, 3, 1, validation=validation)


def test_rollout_vllm_device_steps_are_noops_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_device.release_torch_cache() == {}
    assert not hasattr(vllm_device, "seeded_device_generator")     # measured not to make vLLM repeat


def test_rollout_vllm_wake_releases_torch_cache_first(fake_vllm, monkeypatch):
    """offload_during_rollout=none: nothing else empties the cache before vLLM's cumem wake."""
    cuda = FakeCuda(monkeypatch, reserved=(6 * 2 ** 30, 2 ** 30))
    eng = _engine(sleep_level=1)                                  # always (default); auto: the next test
    eng.state = "asleep"
    order = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: order.append("empty_cache"))
    wake = eng.llm.wake_up
    eng.llm.wake_up = lambda tags=None: order.append("wake") or wake(tags)
    eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    assert order == ["empty_cache", "wake"]
    assert {k: v for k, v in eng.last_metrics.items() if not k.startswith("perf/vllm_")} == {
        "perf/torch_reserved_gib": 6.0, "perf/torch_released_gib": 5.0, "perf/torch_cache_kept": 0.0}
    eng.update_weights(iter([("w", torch.ones(2))]))          # asleep again: the weights' wake releases too
    assert order[2:] == ["empty_cache", "wake"] and cuda is not None


def test_rollout_vllm_keeps_torch_cache_when_the_wake_fits(fake_vllm, monkeypatch):
    """auto: what the last sleep freed (`_wake_need`) + the margin fits in the free memory -> no
    empty_cache (the update keeps its warm allocator); it does not fit, or `always` -> released."""
    gib = 2 ** 30
    cuda = FakeCuda(monkeypatch, reserved=(6 * gib, 6 * gib), free=60 * gib, total=100 * gib)
    sleep = []
    eng = _engine(sleep_level=1, release_torch_cache="auto")
    real_sleep = eng.llm.sleep
    eng.llm.sleep = lambda level=1: (sleep.append(level), setattr(cuda, "free", cuda.free + 40 * gib),
                                     real_sleep(level))[-1]
    eng.state = "awake"
    eng.sleep()                                             # vLLM gave back 40 GiB: that is the wake's need
    assert eng._wake_need == 40 * gib and sleep == [1]
    cuda.free = 43 * gib                                    # 40 + max(2 GiB, 3% of 100) = 43 fits
    assert eng.wake() == {"perf/torch_reserved_gib": 6.0, "perf/torch_released_gib": 0.0, "perf/torch_cache_kept": 1.0}
    assert ("empty_cache",) not in cuda.calls
    eng.state, cuda.free = "asleep", 42 * gib               # 1 GiB short of the margin: released
    eng.wake()
    assert cuda.calls.count(("empty_cache",)) == 1
    eng.cfg = dataclasses.replace(eng.cfg, release_torch_cache="always")
    eng.state, cuda.free = "asleep", 90 * gib
    eng.wake()
    assert cuda.calls.count(("empty_cache",)) == 2
    assert VLLMConfig().release_torch_cache == "always"      # the default (vllm_config.py says why)
    with pytest.raises(ValueError, match="rollout.vllm.release_torch_cache"):
        VLLMConfig(release_torch_cache="never")
