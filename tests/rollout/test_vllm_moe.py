"""vLLM with MoE models, on fake vLLM objects that follow vLLM 0.26.0's sources:

- routing replay: `enable_return_routed_experts` at start-up, `CompletionOutput.routed_experts`
  (`[prompt + generated - 1, num_hidden_layers, top_k]`, logical ids, see
  vllm/v1/core/sched/scheduler.py `update_from_output` and vllm/outputs.py) mapped into
  `prompt_routed_experts` / `response_routed_experts` exactly as the native engine records
  them, and replayed by the trainer;
- weight sync: the actor's stream at EP=2 gives every name vLLM's Qwen3-MoE / Mixtral
  `load_weights` maps onto its fused `w13_weight` / `w2_weight`, once, with the right shape,
  and the fused parameters equal a load from the checkpoint.
"""
import json
import types
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.vllm_config import VLLMConfig
from megatron_rl.rollout.vllm_convert import outputs_to_batch
from tests.helpers import make_tiny_hf, run_multiproc

TOK = types.SimpleNamespace(eos_token_id=95, pad_token_id=0)


def _completion(index, tokens, routed):
    return types.SimpleNamespace(index=index, token_ids=tokens, finish_reason="stop", logprobs=None,
                                 routed_experts=routed)


def _vllm_routing(prompt_len, n_tokens, layers=3, k=2, seed=0):
    """What vLLM returns: one row per fed token (prompt + all generated but the last), every
    decoder layer (layer 1 dense: zeros), logical expert ids, uint8 as its slot buffer."""
    g = np.random.default_rng(seed)
    r = g.integers(0, 4, size=(prompt_len + n_tokens - 1, layers, k)).astype(np.uint8)
    r[:, 1] = 0
    return r


# --- routing replay: CompletionOutput.routed_experts -> the batch ------------------------------

def test_vllm_routed_experts_align_with_left_padded_prompts_and_right_padded_responses():
    prompts = Batch({"prompt_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
                     "prompt_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}, [{"uid": "a"}, {"uid": "b"}])
    routing = {(0, 0): _vllm_routing(2, 3, seed=1), (0, 1): _vllm_routing(2, 1, seed=2),
               (1, 0): _vllm_routing(4, 2, seed=3), (1, 1): _vllm_routing(4, 4, seed=4)}
    plens = (2, 4)
    outs = [types.SimpleNamespace(outputs=[_completion(j, [3] * (len(routing[i, j]) - plens[i] + 1), routing[i, j])
                                           for j in (1, 0)]) for i in range(2)]        # vLLM's order kept: index
    out = outputs_to_batch(prompts, outs, n=2, pad_id=0, logprobs=False, moe_layers=(0, 2))
    prompt, resp = out["prompt_routed_experts"], out["response_routed_experts"]
    assert prompt.dtype == resp.dtype == torch.int16
    assert prompt.shape == (4, 4, 2, 2) and resp.shape == (4, 4, 2, 2)        # L = 2 MoE layers, top-2
    for row, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        ref = torch.from_numpy(routing[i, j][:, [0, 2]].astype(np.int16)) + 1   # expert id + 1
        plen, n = plens[i], int(out["response_mask"][row].sum())
        assert torch.equal(prompt[row, 4 - plen:], ref[:plen]), (i, j)
        assert bool((prompt[row, : 4 - plen] == 0).all())                       # left padding: not recorded
        assert torch.equal(resp[row, : n - 1], ref[plen:]), (i, j)
        assert bool((resp[row, n - 1:] == 0).all())           # the last sampled token (never fed), padding


def test_vllm_missing_or_misshapen_routing_is_an_error_naming_the_option():
    prompts = Batch({"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]])}, [{"uid": "a"}])
    with pytest.raises(RuntimeError, match="enable_return_routed_experts"):
        outputs_to_batch(prompts, [types.SimpleNamespace(outputs=[_completion(0, [3, 4], None)])], 1, 0,
                         logprobs=False, moe_layers=(0, 2))
    short = _vllm_routing(2, 3)[:1]                             # fewer rows than the prompt
    with pytest.raises(RuntimeError, match=r"expected \[2\.\.5, num_hidden_layers, top_k\]"):
        outputs_to_batch(prompts, [types.SimpleNamespace(outputs=[_completion(0, [3, 4, 5], short)])], 1, 0,
                         logprobs=False, moe_layers=(0, 2))
    with pytest.raises(RuntimeError, match="MoE layer 3 was expected"):
        outputs_to_batch(prompts, [types.SimpleNamespace(outputs=[_completion(0, [3, 4, 5], _vllm_routing(2, 3))])],
                         1, 0, logprobs=False, moe_layers=(0, 3))


def _cfg(path, routing_replay=True):
    from megatron_rl.models.moe_config import MoEConfig

    return types.SimpleNamespace(
        rollout=types.SimpleNamespace(vllm=VLLMConfig(enforce_eager=True), colocate=True, gpu_memory_utilization=0.3,
                                      max_new_tokens=16, weight_sync_bucket_mb=64),
        model=types.SimpleNamespace(path=str(path), tokenizer_path="", dtype="bfloat16",
                                    moe=MoEConfig(routing_replay=routing_replay)),
        data=types.SimpleNamespace(max_prompt_length=32), steering=types.SimpleNamespace(enable=False))


def test_vllm_starts_with_routed_experts_only_under_routing_replay(fake_vllm, tmp_path):
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    started = []
    fake_vllm.LLM = lambda **kw: started.append(kw) or types.SimpleNamespace()
    moe = tmp_path / "moe"
    moe.mkdir()   # tiny Qwen3-MoE: 4 layers, layer 1 dense (mlp_only_layers)
    (moe / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=96,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1])))
    eng = VLLMEngine.from_config(_cfg(moe), TOK)
    assert started[-1]["enable_return_routed_experts"] is True and eng.routing_layers == (0, 2, 3)
    eng = VLLMEngine.from_config(_cfg(moe, routing_replay=False), TOK)
    assert "enable_return_routed_experts" not in started[-1] and eng.routing_layers is None
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "intermediate_size": 128, "vocab_size": 96}))
    with pytest.raises(ValueError, match="model.moe.routing_replay=true: .* is a dense model"):
        VLLMEngine.from_config(_cfg(dense), TOK)


# --- the native engine's recording, re-served as vLLM would return it, replays the same ----------

def _as_vllm_outputs(batch, num_layers, moe_layers):
    """The native engine's recording in vLLM 0.26's format: per completion the fed tokens'
    rows (prompt without padding + every response token but the last), all decoder layers."""
    p = batch["prompt_ids"].shape[1]
    outs = []
    for b in range(len(batch)):
        plen, n = int(batch["prompt_mask"][b].sum()), int(batch["response_mask"][b].sum())
        rows = torch.cat([batch["prompt_routed_experts"][b, p - plen:], batch["response_routed_experts"][b, : n - 1]])
        full = torch.zeros(rows.shape[0], num_layers, rows.shape[-1], dtype=torch.int64)
        full[:, list(moe_layers)] = rows.long() - 1
        outs.append(types.SimpleNamespace(outputs=[_completion(0, batch["response_ids"][b, :n].tolist(),
                                                               full.numpy().astype(np.uint8))]))
    return outs


def test_vllm_routing_equals_the_native_recording_and_replays_exactly(tmp_path):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.trainer.policy import Policy

    init_distributed()
    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", tie=False)
    actor, engine_model = (load_checkpoint(hf, layer_spec="local", moe=MoEConfig(routing_replay=True))
                           for _ in range(2))
    with torch.no_grad():       # the engine's router differs from the trainer's, as a numerics gap would
        for n, p in engine_model.named_parameters():
            if "router" in n:
                p.add_(torch.sin(p * 1e4) * 0.1 * p.std())
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 90, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    prompts = Batch({"prompt_ids": ids, "prompt_mask": mask}, [{"uid": str(i)} for i in range(4)])
    native = NativeEngine(engine_model, TOK).generate(prompts, SamplingParams(n=1, max_new_tokens=8, seed=3))
    vllm = outputs_to_batch(prompts, _as_vllm_outputs(native, 4, (0, 2, 3)), 1, TOK.pad_token_id,
                            logprobs=False, moe_layers=(0, 2, 3))
    assert torch.equal(vllm["prompt_routed_experts"], native["prompt_routed_experts"])
    # A row that ended before the batch did had its last token fed by the native engine's next
    # (batched) step; vLLM never feeds a finished request's last token. Its output scores nothing.
    expect = native["response_routed_experts"].clone()
    for b, n in enumerate(native["response_mask"].sum(-1).long().tolist()):
        expect[b, n - 1] = 0
    assert torch.equal(vllm["response_routed_experts"], expect)
    vllm["rollout_logprob"] = native["rollout_logprob"]
    m = native["response_mask"]
    gaps = []
    for replay in (True, False):
        policy = Policy(actor, micro_batch_size=2, routing_replay=replay)
        lp, _ = policy.compute_logprobs(vllm)
        gaps.append(float(((lp - vllm["rollout_logprob"]).abs() * m).sum() / m.sum()))
        if replay:
            metrics = policy.routing_replay.collect()
    assert metrics["moe/replay_agree_frac"] == 1.0 and metrics["moe/replay_mismatch_frac"] > 0.02
    assert gaps[0] * 5 < gaps[1], gaps


# --- weight sync: the HF names vLLM 0.26's fused-MoE loaders take ------------------------------

def _num_experts(cfg: dict) -> int:
    """vLLM's `get_num_experts` (routed_experts_capturer.py): transformers 5 saves Qwen3-MoE's
    `num_experts` as `num_local_experts`."""
    return next(cfg[k] for k in ("num_experts", "n_routed_experts", "num_local_experts") if cfg.get(k) is not None)


def vllm_expected_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} that vLLM 0.26.0's `load_weights` consumes for this config (TP=1, no
    EPLB redundancy). Which layers are sparse: `Qwen3MoeDecoderLayer.__init__`
    (vllm/model_executor/models/qwen3_moe.py: not in `mlp_only_layers` and
    `(layer_idx + 1) % decoder_sparse_step == 0`; Mixtral: every layer). Expert names:
    `RoutedExperts.build_expert_params_mapping` (vllm/model_executor/layers/fused_moe/
    routed_experts.py), `experts.{e}.{gate|down|up}.` for e in range(num_experts), with the
    checkpoint names `gate_proj/down_proj/up_proj` (the FusedMoE default) or Mixtral's
    `ckpt_names=("w1", "w2", "w3")` (vllm/model_executor/models/mixtral.py)."""
    qwen = cfg["model_type"] == "qwen3_moe"
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    experts = _num_experts(cfg)
    f_moe = cfg["moe_intermediate_size"] if qwen else cfg["intermediate_size"]
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                    p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd)})
        if qwen:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        sparse = (not qwen) or (i not in (cfg.get("mlp_only_layers") or [])
                                and experts > 0 and (i + 1) % cfg.get("decoder_sparse_step", 1) == 0)
        if not sparse:
            f = cfg["intermediate_size"]
            out.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                        p + "mlp.down_proj.weight": (h, f)})
            continue
        block = p + ("mlp." if qwen else "block_sparse_moe.")
        gate, down, up = ("gate_proj", "down_proj", "up_proj") if qwen else ("w1", "w2", "w3")
        out[block + "gate.weight"] = (experts, h)
        for e in range(experts):
            for shard, w in (("w1", gate), ("w2", down), ("w3", up)):
                out[f"{block}experts.{e}.{w}.weight"] = (h, f_moe) if shard == "w2" else (f_moe, h)
    return out


class FakeVllmMoEModel(torch.nn.Module):
    """vLLM 0.26.0's TP=1 parameter layout of Qwen3MoeForCausalLM / MixtralForCausalLM and its
    `load_weights` routing: q/k/v -> `qkv_proj` and dense gate/up -> `gate_up_proj`
    (`WeightsMapper.orig_to_new_stacked`), per-expert tensors into `experts.w13_weight`
    `[E, 2f, h]` (w1 rows then w3 rows) and `experts.w2_weight` `[E, h, f]` (the
    `expert_params_mapping` substring match of `RoutedExperts.load_weights`), the rest by name.
    A name it cannot place, or a slice of the wrong shape, is an error (as in vLLM)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg, self.expected = cfg, vllm_expected_weights(cfg)
        self.received: Counter = Counter()
        self.params: dict[str, torch.Tensor] = {}
        for name in self.expected:
            self._slot(name)

    def _slot(self, name: str):
        """(vLLM parameter name, its full shape, the slice this HF name fills)."""
        shapes = self.expected
        m = name.split(".experts.")
        if len(m) == 2:
            e, w = m[1].split(".")[:2]
            f, h = shapes[name] if w not in ("down_proj", "w2") else shapes[name][::-1]
            n_exp = _num_experts(self.cfg)
            if w in ("down_proj", "w2"):
                return self._param(m[0] + ".experts.w2_weight", (n_exp, h, f)), (int(e),)
            row = slice(0, f) if w in ("gate_proj", "w1") else slice(f, 2 * f)
            return self._param(m[0] + ".experts.w13_weight", (n_exp, 2 * f, h)), (int(e), row)
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".self_attn.{proj}." in name:
                base = name.replace(proj, "PROJ")
                q, k, v = (shapes[base.replace("PROJ", x)][0] for x in ("q_proj", "k_proj", "v_proj"))
                start = {"q_proj": 0, "k_proj": q, "v_proj": q + k}[proj]
                return (self._param(base.replace("PROJ", "qkv_proj"), (q + k + v, shapes[name][1])),
                        (slice(start, start + shapes[name][0]),))
        for proj, half in ((".mlp.gate_proj.", 0), (".mlp.up_proj.", 1)):
            if proj in name:
                f, h = shapes[name]
                return (self._param(name.replace(proj, ".mlp.gate_up_proj."), (2 * f, h)),
                        (slice(half * f, (half + 1) * f),))
        return self._param(name, shapes[name]), ()

    def _param(self, name, shape):
        if name not in self.params:
            self.params[name] = torch.full(shape, float("nan"))
        return self.params[name]

    def load_weights(self, weights):
        for name, t in weights:
            if name not in self.expected:
                raise KeyError(f"vLLM's loader has no parameter for {name!r}")
            if tuple(t.shape) != self.expected[name]:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, vLLM expects {self.expected[name]}")
            param, idx = self._slot(name)
            param[idx] = t.to(param.dtype)
            self.received[name] += 1
        return set(self.received)


def _sync_worker(rank, world, dirs, out):
    from safetensors.torch import load_file

    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    init_distributed(ep=world)
    results = {}
    for hf in dirs:
        cfg = json.loads(open(f"{hf}/config.json").read())
        model = load_checkpoint(hf, layer_spec="local")
        llm = types.SimpleNamespace(model=FakeVllmMoEModel(cfg), reset_prefix_cache=lambda: None)
        llm.apply_model = lambda fn, llm=llm: [fn(llm.model)]
        engine = VLLMEngine(llm, TOK, VLLMConfig(sleep_level=0), colocate=True, bucket_mb=16 / 1024)
        metrics = engine.sync_weights(model)
        ref = FakeVllmMoEModel(cfg)                      # what vLLM loads from the checkpoint itself
        ref.load_weights(load_file(f"{hf}/model.safetensors").items())
        results[cfg["model_type"]] = dict(received=dict(llm.model.received), expected=llm.model.expected,
                                          synced=llm.model.params, ref=ref.params, metrics=metrics)
    if rank == 0:
        torch.save(results, out)
    destroy_distributed()


@pytest.mark.multiproc
def test_vllm_weight_sync_at_ep2_feeds_every_fused_moe_param_once(tmp_path):
    dirs = [make_tiny_hf(tmp_path / "qwen3_moe", "qwen3_moe", tie=False),
            make_tiny_hf(tmp_path / "mixtral", "mixtral", tie=False)]
    run_multiproc(_sync_worker, 2, (dirs, str(tmp_path / "out.pt")))
    results = torch.load(tmp_path / "out.pt")
    for family, r in results.items():
        assert r["received"] == {n: 1 for n in r["expected"]}, family       # every name, exactly once
        assert r["synced"].keys() == r["ref"].keys()
        for name, ref in r["ref"].items():
            assert not torch.isnan(ref).any() and torch.equal(r["synced"][name], ref), (family, name)
        assert r["metrics"]["weight_sync/buckets"] > 1
    moe = results["qwen3_moe"]["synced"]
    assert moe["model.layers.0.mlp.experts.w13_weight"].shape == (4, 96, 64)     # [E, 2 f_moe, h]
    assert "model.layers.1.mlp.gate_up_proj.weight" in moe                      # the dense layer (mlp_only_layers)
    assert results["mixtral"]["synced"]["model.layers.3.block_sparse_moe.experts.w2_weight"].shape == (4, 64, 48)
