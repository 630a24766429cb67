"""rollout.vllm.per_request_seed and the device steps around a colocated generate: seeds per
prompt (True) or none plus a seeded device generator (False, the default), torch's cache
released before every wake, with its size in the rollout metrics."""
import pytest
import torch

from megatron_rl.rollout import vllm_device
from megatron_rl.rollout.protocol import SamplingParams
from tests.rollout.test_rollout_vllm_engine import _engine, _prompts


class FakeCuda:
    """The few torch.cuda calls vllm_device makes, recorded in order."""

    def __init__(self, monkeypatch, reserved=(6 * 2 ** 30, 2 ** 30)):
        self.calls, self.reserved = [], list(reserved)
        for name, fn in [("is_available", lambda: True), ("current_device", lambda: 0),
                         ("get_rng_state", lambda d: self.calls.append(("get_rng", d)) or "trainer-state"),
                         ("manual_seed", lambda s: self.calls.append(("seed", s))),
                         ("set_rng_state", lambda st, d: self.calls.append(("set_rng", st, d))),
                         ("memory_reserved", lambda: self.reserved.pop(0) if len(self.reserved) > 1 else self.reserved[0]),
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


@pytest.mark.parametrize("per_request", [False, True])
def test_rollout_vllm_per_request_seed_setting(fake_vllm, monkeypatch, per_request):
    cuda = FakeCuda(monkeypatch)
    eng = _engine(sleep_level=0, per_request_seed=per_request, seed=3)
    eng.dp_rank = 1
    seen = _sent(eng)
    eng.generate(_prompts(), SamplingParams(n=2, max_new_tokens=2, seed=100))
    if per_request:       # one seed per prompt, room for its n children; the device generator untouched
        assert seen == [100, 102, 104] and not [c for c in cuda.calls if c[0] != "empty_cache"]
    else:                 # no request seed; the generator seeded for this call, the trainer's state restored
        assert seen == [None, None, None]
        assert cuda.calls == [("get_rng", 0), ("seed", 100 + 1_000_003 * 3 + 7_919), ("set_rng", "trainer-state", 0)]


def test_rollout_vllm_engine_seed_differs_by_step_and_dp_rank_only():
    seeds = {vllm_device.generate_seed(step, 0, dp) for step in range(4) for dp in range(3)}
    assert len(seeds) == 12
    assert vllm_device.generate_seed(7, 1, 2) == vllm_device.generate_seed(7, 1, 2)
    assert vllm_device.generate_seed(None, 1, 2) is None      # no step seed: the generator is left alone


def test_rollout_vllm_device_steps_are_noops_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_device.release_torch_cache() == {}
    state = torch.get_rng_state()
    with vllm_device.seeded_device_generator(5):
        pass
    assert torch.equal(torch.get_rng_state(), state)


def test_rollout_vllm_wake_releases_torch_cache_first(fake_vllm, monkeypatch):
    """offload_during_rollout=none: nothing else empties the cache before vLLM's cumem wake."""
    cuda = FakeCuda(monkeypatch, reserved=(6 * 2 ** 30, 2 ** 30))
    eng = _engine(sleep_level=1)
    eng.state = "asleep"
    order = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: order.append("empty_cache"))
    wake = eng.llm.wake_up
    eng.llm.wake_up = lambda tags=None: order.append("wake") or wake(tags)
    eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    assert order == ["empty_cache", "wake"]
    assert eng.last_metrics == {"perf/torch_reserved_gib": 6.0, "perf/torch_released_gib": 5.0}
    eng.update_weights(iter([("w", torch.ones(2))]))          # asleep again: the weights' wake releases too
    assert order[2:] == ["empty_cache", "wake"] and cuda is not None
