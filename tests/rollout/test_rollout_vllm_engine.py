"""The vLLM engine's pure-Python parts, with fake vLLM objects: sampling-parameter
mapping, prompts without padding, RequestOutputs -> Batch, steering groups, the
sleep/wake state machine, bucketed weight loading, and the error without vLLM."""
import sys
import types

import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.vllm_config import VLLMConfig
from megatron_rl.rollout.vllm_convert import (outputs_to_batch, prompt_token_lists, request_seeds,
                                              steering_groups, token_logprobs, vllm_sampling_kwargs)


def _prompts():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    return Batch({"prompt_ids": ids, "prompt_mask": mask}, [{"uid": f"p{i}"} for i in range(3)])


def _completion(index, tokens, lps):
    return types.SimpleNamespace(index=index, token_ids=tokens, finish_reason="stop",
                                 logprobs=[{t: types.SimpleNamespace(logprob=lp), 99: -0.1} for t, lp in zip(tokens, lps)])


def test_rollout_sampling_kwargs_sampled():
    kw = vllm_sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, n=4, max_new_tokens=32,
                                             stop=["###"]), seed=11, stop_token_ids=[2, 5])
    assert kw == dict(n=4, max_tokens=32, logprobs=0, seed=11, stop=["###"],
                      include_stop_str_in_output=True, detokenize=True, skip_special_tokens=False,
                      stop_token_ids=[2, 5], temperature=0.7, top_p=0.9, top_k=0)
    none = vllm_sampling_kwargs(SamplingParams(n=4, max_new_tokens=32, logprobs=False), seed=11)
    assert "logprobs" not in none and "flat_logprobs" not in none    # not asked: vLLM computes none


def test_rollout_sampling_kwargs_greedy_is_temperature_zero():
    kw = vllm_sampling_kwargs(SamplingParams(greedy=True, temperature=0.7, top_k=5, max_new_tokens=8))
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["stop"], kw["detokenize"]) == (0.0, 0, 1.0, None, False)


def test_rollout_outputs_without_logprobs_have_no_rollout_logprob():
    outs = [types.SimpleNamespace(outputs=[types.SimpleNamespace(index=0, token_ids=[3, 4], finish_reason="stop",
                                                                 logprobs=None)]) for _ in range(3)]
    out = outputs_to_batch(_prompts(), outs, n=1, pad_id=1, logprobs=False)
    assert "rollout_logprob" not in out and out["response_ids"].tolist() == [[3, 4]] * 3


def test_rollout_flat_logprobs_read_like_dicts():
    """vLLM's FlatLogprobs (flat_logprobs=True) give the same values as the per-token dicts."""
    flat = types.SimpleNamespace(start_indices=[0, 2, 3], end_indices=[2, 3, 5], token_ids=[99, 3, 4, 7, 2],
                                 logprobs=[-0.1, -1.0, -2.0, -0.3, -0.5])
    assert token_logprobs(types.SimpleNamespace(token_ids=[3, 4, 2], logprobs=flat)) == [-1.0, -2.0, -0.5]
    bad = types.SimpleNamespace(token_ids=[3, 5, 2], logprobs=flat)
    with pytest.raises(RuntimeError, match="position 1 lack the sampled token 5"):
        token_logprobs(bad)


def test_rollout_request_seeds_leave_room_for_n_children():
    seeds = request_seeds(SamplingParams(seed=100, n=4), 3)
    assert [b - a for a, b in zip(seeds, seeds[1:])] == [4, 4] and 0 <= seeds[0] < 2**62
    assert request_seeds(SamplingParams(seed=100, n=4), 3) == seeds            # deterministic
    assert request_seeds(SamplingParams(seed=None), 2) == [None, None]


def test_rollout_request_seeds_of_later_steps_do_not_repeat_earlier_ones():
    """Step seeds grow by 1 per step: no (step, prompt, child) seed may recur over a run."""
    n, prompts = 8, 64
    drawn = [s + j for step in range(300) for s in request_seeds(SamplingParams(seed=step, n=n), prompts)
             for j in range(n)]
    assert len(set(drawn)) == len(drawn)


def test_rollout_prompt_token_lists_drop_left_padding():
    assert prompt_token_lists(_prompts()) == [[5, 6], [7, 8, 9, 10], [11, 12, 13]]


def test_rollout_outputs_to_batch_layout():
    batch = _prompts()
    outs = [types.SimpleNamespace(outputs=[_completion(1, [3, 4, 2], [-1.0, -2.0, -0.5]), _completion(0, [6], [-3.0])])
            for _ in range(3)]
    out = outputs_to_batch(batch, outs, n=2, pad_id=1)
    assert out["response_ids"].tolist()[:2] == [[6, 1, 1], [3, 4, 2]]          # sorted by completion index
    assert out["response_mask"].tolist()[:2] == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert out["response_mask"].dtype == torch.float32
    assert out["rollout_logprob"].tolist()[:2] == [[-3.0, 0.0, 0.0], [-1.0, -2.0, -0.5]]
    assert out["prompt_ids"].shape == (6, 4) and torch.equal(out["prompt_ids"][4], batch["prompt_ids"][2])
    assert [s["group"] for s in out.samples] == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert out.samples[0]["finish_reason"] == "stop"


def test_rollout_outputs_to_batch_wrong_n_is_an_error():
    outs = [types.SimpleNamespace(outputs=[_completion(0, [3], [-1.0])])] * 3
    with pytest.raises(RuntimeError, match="1 completions for prompt 0, expected n=2"):
        outputs_to_batch(_prompts(), outs, n=2, pad_id=0)


def test_rollout_token_logprobs_without_logprobs_is_an_error():
    c = types.SimpleNamespace(token_ids=[1, 2], logprobs=None)
    with pytest.raises(RuntimeError, match="logprobs must be 0"):
        token_logprobs(c)


def test_rollout_steering_groups_by_strength_and_prompt_length():
    batch = _prompts()
    batch["steer_strengths"] = torch.tensor([[1.0], [2.0], [1.0]])
    assert steering_groups(batch, by_prompt_len=False) == [((1.0,), None, [0, 2]), ((2.0,), None, [1])]
    assert steering_groups(batch, by_prompt_len=True) == [((1.0,), 2, [0]), ((2.0,), 4, [1]), ((1.0,), 3, [2])]


def test_rollout_vllm_config_rejects_unknown_transport():
    with pytest.raises(ValueError, match="rollout.vllm.transport must be one of"):
        VLLMConfig(transport="carrier-pigeon")


def test_rollout_missing_vllm_is_a_clear_error(monkeypatch):
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = types.SimpleNamespace(rollout=types.SimpleNamespace())
    with pytest.raises(ImportError, match="rollout.engine=vllm needs the 'vllm' package"):
        VLLMEngine.from_config(cfg, None)


# --- the engine around a fake LLM --------------------------------------------------------------

class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.loaded = {}

    def load_weights(self, weights):
        for n, t in weights:
            self.loaded[n] = t.clone()
        return set(self.loaded)


class FakeLLM:
    """Echoes `prompt[-1] + k` for k = 1..max_tokens, logprob -k; records engine calls."""

    def __init__(self):
        self.model, self.calls = FakeModel(), []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", len(prompts)))
        outs = []
        for p, sp in zip(prompts, params):
            last = p["prompt_token_ids"][-1]
            toks = [last + k for k in range(1, sp.kw["max_tokens"] + 1)]
            outs.append(types.SimpleNamespace(outputs=[_completion(j, toks, [-float(k) for k in range(1, len(toks) + 1)])
                                                       for j in range(sp.kw["n"])]))
        return outs

    def apply_model(self, fn):
        return [fn(self.model)]

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake", tuple(tags) if tags else None))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _engine(**cfg):
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    tok = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    return VLLMEngine(FakeLLM(), tok, VLLMConfig(**cfg), colocate=True, bucket_mb=1024 / 2 ** 20)


def test_rollout_engine_generate_then_sleeps(fake_vllm):
    eng = _engine(sleep_level=1)
    out = eng.generate(_prompts(), SamplingParams(n=2, max_new_tokens=3))
    assert out["response_ids"][2].tolist() == [11, 12, 13]
    assert out["rollout_logprob"][2].tolist() == [-1.0, -2.0, -3.0]
    assert eng.llm.calls == [("generate", 3), ("sleep", 1)] and eng.state == "asleep"


def test_rollout_engine_sync_wakes_weights_then_kv(fake_vllm):
    eng = _engine(sleep_level=2)
    eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    with pytest.raises(RuntimeError, match="level 2"):
        eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    big = torch.randn(40, 33)
    metrics = eng.update_weights(iter([("model.embed_tokens.weight", big), ("model.norm.weight", torch.ones(4))]))
    assert torch.equal(eng.llm.model.loaded["model.embed_tokens.weight"], big)      # split over 6 buckets, rejoined
    assert metrics["weight_sync/buckets"] == 6 and metrics["weight_sync/bytes"] == 40 * 33 * 4 + 16
    eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    assert eng.llm.calls[2:] == [("wake", ("weights",)), ("reset_prefix_cache",), ("wake", ("kv_cache",)),
                                 ("generate", 3), ("sleep", 2)]


def test_rollout_engine_one_generate_call_per_strength_group(fake_vllm):
    eng = _engine(sleep_level=0)
    seen = []
    eng._set_steering = lambda s, p: seen.append((s, p))
    eng.steering_scope = "generated"
    batch = _prompts()
    batch["steer_strengths"] = torch.tensor([[1.0], [1.0], [3.0]])
    out = eng.generate(batch, SamplingParams(max_new_tokens=2))
    assert seen == [((1.0,), 2), ((1.0,), 4), ((3.0,), 3)]
    assert {k: v for k, v in eng.last_metrics.items() if not k.startswith("perf/vllm_")} == {
        "rollout/vllm_steering_calls": 3.0}
    assert [c for c in eng.llm.calls if c[0] == "generate"] == [("generate", 1)] * 3
    assert out["response_ids"].tolist() == [[7, 8], [11, 12], [14, 15]]          # rows back in prompt order
    assert "steer_strengths" in out


def test_rollout_engine_disabled_steering_stays_off_through_generate(fake_vllm):
    """set_steering_enabled(False) must survive the per-group strength update in generate
    (an H100 run showed identical outputs with steering "off" and on)."""
    from megatron_rl.steering.vllm_hooks import ATTR

    eng = _engine(sleep_level=0)
    states = []

    class Hook:
        def set_state(self, strengths, prompt_len, enabled=True):
            states.append(enabled)

    setattr(eng.llm.model, ATTR, Hook())
    eng.steering_scope = "all"
    eng.set_steering_enabled(False)
    eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    eng.set_steering_enabled(True)
    eng.generate(_prompts(), SamplingParams(max_new_tokens=1))
    assert states == [False, True]                      # unchanged state is not re-sent


def test_rollout_engine_steering_change_resets_the_prefix_cache(fake_vllm):
    """Prompt KV cached under one steering state must not serve another (an H100 run showed
    steered vLLM log-probs 0.09 off Megatron's, vs 0.007 unsteered, from exactly that)."""
    eng = _engine(sleep_level=0)
    eng.steering_scope = "all"
    eng._steer_key = None
    sent = []
    eng.llm.apply_model = lambda fn: sent.append(fn.keywords["strengths"]) or [True]
    batch = _prompts()
    batch["steer_strengths"] = torch.tensor([[1.0], [1.0], [1.0]])
    eng.generate(batch, SamplingParams(max_new_tokens=1))
    eng.generate(batch, SamplingParams(max_new_tokens=1))
    assert len(sent) == 1 and ("reset_prefix_cache",) not in eng.llm.calls
    batch["steer_strengths"] = torch.tensor([[2.0], [2.0], [3.0]])
    eng.generate(batch, SamplingParams(max_new_tokens=1))
    assert len(sent) == 3 and eng.llm.calls.count(("reset_prefix_cache",)) == 2
    eng.set_steering_enabled(False)
    eng.generate(batch, SamplingParams(max_new_tokens=1))
    assert eng.llm.calls.count(("reset_prefix_cache",)) == 4


def test_rollout_engine_sync_weights_takes_policy_or_model(fake_vllm, monkeypatch):
    from megatron_rl.models import loading

    eng = _engine(sleep_level=0)
    seen = []
    monkeypatch.setattr(loading, "iter_hf_weights", lambda m: seen.append(m) or iter([("w", torch.ones(2))]))
    model = object()
    eng.sync_weights(types.SimpleNamespace(chunks=[model]))     # a Policy: its chunk list
    eng.sync_weights(model)
    assert seen == [[model], model]


@pytest.mark.parametrize("eager", [True, False])
def test_rollout_from_config_builds_graph_steering_without_eager(fake_vllm, monkeypatch, tmp_path, eager):
    """enforce_eager=false + steering: vLLM starts the steered architecture (buffers on the
    steering layer) and the intervention binds to them; eager mode registers a hook."""
    import json

    from megatron_rl.rollout import vllm_engine
    from megatron_rl.steering.interventions import build_intervention
    from megatron_rl.steering.sae import SAE
    from megatron_rl.steering.vllm_graph import LAYERS_KEY, STEERED_ARCH

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    sae = SAE({"architecture": "standard", "d_in": 4, "d_sae": 8, "hook_name": "blocks.0.hook_resid_post"},
              {"W_enc": torch.ones(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.ones(8, 4), "b_dec": torch.zeros(4)})
    monkeypatch.setattr(vllm_engine, "steering_intervention",
                        lambda s: (build_intervention("add", sae, feature_idxs=[1], strengths=[2.0]), 0))
    started, registry = {}, {}
    attached = []

    class LLM(FakeLLM):
        def __init__(self, **kw):
            super().__init__()
            started.update(kw)

        def apply_model(self, fn):
            attached.append(fn.keywords)
            return [True]

    fake_vllm.LLM = LLM
    fake_vllm.ModelRegistry = types.SimpleNamespace(get_supported_archs=lambda: list(registry),
                                                    register_model=lambda a, c: registry.__setitem__(a, c))
    cfg = types.SimpleNamespace(
        rollout=types.SimpleNamespace(vllm=VLLMConfig(enforce_eager=eager, extra_args={"max_num_seqs": 8}),
                                      colocate=True, gpu_memory_utilization=0.3, max_new_tokens=16,
                                      weight_sync_bucket_mb=64),
        model=types.SimpleNamespace(path=str(tmp_path), tokenizer_path="", dtype="bfloat16"),
        data=types.SimpleNamespace(max_prompt_length=32),
        steering=types.SimpleNamespace(enable=True, scope="generated"))
    eng = vllm_engine.VLLMEngine.from_config(cfg, types.SimpleNamespace(eos_token_id=2, pad_token_id=0))
    assert started["enforce_eager"] is eager and started["max_num_seqs"] == 8
    assert attached[0]["graph"] is (not eager) and attached[0]["scope"] == "generated"
    assert eng.steering_scope == "generated"
    if eager:
        assert "hf_overrides" not in started and not registry
    else:
        assert started["hf_overrides"] == {"architectures": [STEERED_ARCH], LAYERS_KEY: [0]}
        assert registry == {STEERED_ARCH: "megatron_rl.steering.vllm_graph_model:SteeredLlamaForCausalLM"}


@pytest.mark.parametrize("tp,backend,ipc", [(1, "", False), (2, "", True), (2, "mp", True),
                                            (2, "external_launcher", False)])
def test_rollout_ipc_only_when_workers_live_in_other_processes(fake_vllm, tp, backend, ipc):
    eng = _engine(sleep_level=0, tensor_parallel_size=tp, distributed_executor_backend=backend)
    assert eng.workers_in_other_processes is ipc


def test_rollout_spmd_layout_groups_must_share_a_dp_rank():
    from megatron_rl.rollout.vllm_engine import spmd_layout_error

    # Megatron order: TP fastest. tp=2, dp=2 -> dp ranks [0, 0, 1, 1]
    assert spmd_layout_error([0, 0, 1, 1], 2) is None
    assert spmd_layout_error([0, 0, 1, 1], 1) is None
    assert "spans trainer data-parallel ranks [0, 1]" in spmd_layout_error([0, 0, 1, 1], 4)
    assert "not a multiple" in spmd_layout_error([0, 0, 1, 1], 3)
    # tp=2, dp=2, pp=2 (pp slowest): [0, 0, 1, 1, 0, 0, 1, 1]
    assert spmd_layout_error([0, 0, 1, 1, 0, 0, 1, 1], 2) is None
    assert spmd_layout_error([0, 0, 1, 1, 0, 0, 1, 1], 4) is not None


def test_rollout_spmd_defaults_leave_single_process_alone():
    from megatron_rl.rollout.vllm_engine import spmd_defaults

    v = VLLMConfig()
    assert spmd_defaults(v) is v


def _spmd_proc(rank, world):
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.vllm_engine import spmd_defaults

    init_distributed(tp=1)                                    # DP=2: ranks hold different prompts
    assert spmd_defaults(VLLMConfig()).distributed_executor_backend == "external_launcher"
    assert spmd_defaults(VLLMConfig(distributed_executor_backend="mp")).distributed_executor_backend == "mp"
    with pytest.raises(ValueError, match=r"rollout.vllm: vLLM TP group of ranks 0..1 spans"):
        spmd_defaults(VLLMConfig(tensor_parallel_size=2))


def test_rollout_spmd_defaults_under_torchrun_pick_external_launcher():
    from tests.helpers import run_multiproc

    run_multiproc(_spmd_proc, 2)


def test_rollout_engine_per_request_steering_is_one_call(fake_vllm):
    """Graph mode with per-request rows: one vLLM call, each request carrying its strengths
    (extra_args) and a prefix-cache salt of them."""
    eng = _engine(sleep_level=0)
    eng.steering_scope, eng.per_request = "generated", True
    seen = []
    real = eng.llm.generate
    eng.llm.generate = lambda prompts, params, use_tqdm=False: seen.append((prompts, params)) or real(prompts, params)
    batch = _prompts()
    batch["steer_strengths"] = torch.tensor([[1.0], [1.0], [3.0]])
    out = eng.generate(batch, SamplingParams(max_new_tokens=2))
    assert len(seen) == 1 and {k: v for k, v in eng.last_metrics.items() if not k.startswith("perf/vllm_")} == {
        "rollout/vllm_steering_calls": 1.0}
    prompts, params = seen[0]
    assert [p.kw["extra_args"]["mrl_steering"] for p in params] == [
        {"strengths": [1.0], "enabled": True}, {"strengths": [1.0], "enabled": True},
        {"strengths": [3.0], "enabled": True}]
    assert prompts[0]["cache_salt"] == prompts[1]["cache_salt"] != prompts[2]["cache_salt"]
    assert out["response_ids"].tolist() == [[7, 8], [11, 12], [14, 15]]
    eng.set_steering_enabled(False)
    eng.generate(batch, SamplingParams(max_new_tokens=2))
    assert all(p.kw["extra_args"]["mrl_steering"]["enabled"] is False for p in seen[1][1])
    assert seen[1][0][0]["cache_salt"] != prompts[0]["cache_salt"]


@pytest.mark.parametrize("steer_mode, expect_eager", [(None, False), ("add", False), ("clamp", True)])
def test_rollout_enforce_eager_unset_means_cuda_graphs_unless_hooks_are_needed(fake_vllm, monkeypatch, tmp_path,
                                                                              steer_mode, expect_eager):
    """rollout.vllm.enforce_eager unset: CUDA graphs, except for a non-additive steering mode."""
    import json

    from megatron_rl.rollout import vllm_engine

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    monkeypatch.setattr(vllm_engine, "steering_intervention",
                        lambda s: (types.SimpleNamespace(name=steer_mode), 0))
    monkeypatch.setattr(vllm_engine.VLLMEngine, "attach_intervention", lambda self, *a, **k: None)
    monkeypatch.setattr("megatron_rl.steering.vllm_graph.register_steered_arch", lambda: None)
    monkeypatch.setattr("megatron_rl.steering.vllm_graph.graph_overrides", lambda *a, **k: {})
    started = {}

    class LLM(FakeLLM):
        def __init__(self, **kw):
            super().__init__()
            started.update(kw)

    fake_vllm.LLM = LLM
    cfg = types.SimpleNamespace(
        rollout=types.SimpleNamespace(vllm=VLLMConfig(), colocate=True, gpu_memory_utilization=0.3,
                                      max_new_tokens=16, weight_sync_bucket_mb=64),
        model=types.SimpleNamespace(path=str(tmp_path), tokenizer_path="", dtype="bfloat16"),
        data=types.SimpleNamespace(max_prompt_length=32),
        steering=types.SimpleNamespace(enable=steer_mode is not None, scope="all"))
    eng = vllm_engine.VLLMEngine.from_config(cfg, types.SimpleNamespace(eos_token_id=2, pad_token_id=0))
    assert started["enforce_eager"] is expect_eager and eng.cfg.enforce_eager is expect_eager
