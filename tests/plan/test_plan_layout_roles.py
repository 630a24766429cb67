"""Run-plan layout checks (naming the key), roles and placement, loss backend, the model
shape sources, and the memory estimate read from the plan."""
import json
from pathlib import Path

import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import PlanError, resolve_plan
from megatron_rl.plan import memory as mp

BASE = ["data.train_batch_size=8", "rollout.n=4"]
LLAMA_70B = Path(__file__).resolve().parents[2] / "configs" / "llama3_70b_grpo.yaml"


def plan(*overrides, world_size=1, device="cpu", shape=None):
    return resolve_plan(load_experiment_config(None, BASE + list(overrides)), world_size=world_size, device=device,
                        shape=shape)


@pytest.mark.parametrize("world,overrides,shape,match", [
    (6, ["model.tp=4"], None, r"world size 6 is not divisible by model.tp \* model.pp \* model.cp = 4 \* 1 \* 1"),
    (2, ["model.vpp=2"], None, r"model.vpp=2 needs model.pp > 1"),
    (4, ["model.pp=4", "model.vpp=4"], "smollm2-135m", r"model.vpp=4: num_layers=30 is not divisible by "
                                                       r"model.pp \* model.vpp = 4 \* 4 = 16"),
    (4, ["model.pp=4"], "smollm2-135m", r"model.pp=4: num_layers=30"),
    (2, ["model.tp=2"], "smollm2-135m", r"model.tp=2: num_kv_heads=3"),
    (2, ["model.cp=2", "model.layer_spec=local"], None, r"model.cp=2: model.layer_spec=local resolves to local"),
    (2, ["model.ep=2"], "smollm2-135m", r"model.ep=2: expert parallelism needs a mixture-of-experts model"),
    (1, ["model.etp=2"], None, r"world size 1 is not divisible by model.etp \* model.ep \* model.pp"),
    (1, ["rollout.colocate=false"], None, r"rollout.colocate=false: set rollout.placement: disaggregated"),
    (1, ["rollout.engine=vllm"], None, r"rollout.engine=vllm needs device cuda"),
    (1, ["actor.fused_loss=on"], None, r"actor.fused_loss=on needs a CUDA GPU"),
])
def test_impossible_layouts_name_the_key(world, overrides, shape, match):
    with pytest.raises(PlanError, match=match):
        plan(*overrides, world_size=world, shape=shape)


def test_valid_interleaved_layout():
    lay = plan("model.pp=2", "model.vpp=3", "model.tp=3", "model.sequence_parallel=true", world_size=12,
               shape="smollm2-135m").layout
    assert (lay.tp, lay.pp, lay.vpp, lay.dp, lay.sequence_parallel) == (3, 2, 3, 2, True)


@pytest.mark.parametrize("setting,device,backend", [("auto", "cpu", None), ("off", "cpu", "torch"),
                                                    ("on", "cuda", "triton"), ("auto", "cuda", None)])
def test_loss_backend_follows_actor_fused_loss(setting, device, backend):
    assert plan(f"actor.fused_loss={setting}", device=device).loss_backend == backend


def test_roles_and_placement():
    assert [r.name for r in plan().roles] == ["actor"]
    kl = plan("algos.use_kl_loss=true")
    assert [r.name for r in kl.roles] == ["actor", "reference"] and kl.role("reference").placement == "cpu"
    assert not kl.role("reference").trainable
    assert [r.name for r in plan("algos.use_kl_loss=true", "ref.enable=false").roles] == ["actor"]
    on_gpu = plan("ref.enable=true", "ref.offload=true", device="cuda").role("reference")
    assert (on_gpu.offload, on_gpu.placement) == (True, "host_offload")
    assert plan("ref.enable=true", device="cuda").role("reference").placement == "gpu"
    with pytest.raises(KeyError, match="no role 'critic'"):
        kl.role("critic")
    assert any("ref.offload has no effect on cpu" in n for n in plan("ref.enable=true", "ref.offload=true").notes)


def test_gpu_plan_with_padded_microbatches_notes_packing():
    packs = lambda *o, device="cuda": any("packed ones are the faster GPU path" in n
                                          for n in plan("model.layer_spec=sdpa", *o, device=device).notes)
    assert packs() and not packs(device="cpu") and not packs("actor.max_tokens_per_microbatch=4096")
    from types import SimpleNamespace as NS

    from megatron_rl.plan.run_plan import _packable
    cfg = lambda vpp=None, steer=False: NS(model=NS(vpp=vpp), steering=NS(enable=steer))
    assert _packable(cfg(), NS(shape=None)) and not _packable(cfg(vpp=2), NS(shape=None))
    assert not _packable(cfg(steer=True), NS(shape=None)) and not _packable(cfg(), NS(shape=NS(vision=object())))


def test_token_weights_apply_to_follows_an_active_source():
    assert plan("algos.token_weights_apply_to=mask").token_weights_apply_to == "mask"
    assert plan("token_weights.source=reward", "token_weights.apply_to=pg",
                "algos.token_weights_apply_to=mask").token_weights_apply_to == "pg"


def test_shape_from_model_path_hf_config_and_megatron_meta(tmp_path):
    from megatron_rl.models import ModelArch
    from megatron_rl.models.hf_config import arch_to_hf_config
    arch = ModelArch("llama", 6, 64, 4, 2, 16, 128, 96, 256, 10000.0, 1e-5, True, False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(arch_to_hf_config(arch)))
    p = plan(f"model.path={hf}", "model.pp=3", "model.vpp=2", "data.train_batch_size=12", world_size=3)
    assert p.model.shape.num_layers == 6 and p.model.shape_source.startswith("hf checkpoint")
    with pytest.raises(PlanError, match="model.tp=4: num_kv_heads=2"):
        plan(f"model.path={hf}", "model.tp=4", world_size=4)
    mc = tmp_path / "mcore"
    mc.mkdir()
    (mc / "megatron_rl.json").write_text(json.dumps({"format": "megatron_rl.mcore.v1", "arch": arch.to_dict()}))
    assert plan(f"model.path={mc}").model.shape_source.startswith("mcore checkpoint")


def test_unknown_shape_skips_checks_and_says_so():
    p = plan("model.path=/nowhere/custom-model", "model.pp=2", "model.vpp=7", world_size=2, device="cuda")
    assert p.model.shape is None and p.memory is None
    assert "shape checks skipped" in p.summary() and "model shape unknown" in p.summary()


def test_steering_predictor_freezes_the_llm():
    p = plan("steering.enable=true", "steering.feature_idxs=[1]", "steering.predictor.enable=true",
             "steering.predictor.n_samples=4")
    assert p.recipe == "steering_predictor" and not p.role("actor").trainable
    assert p.role("actor").optimizer_steps_per_rollout == 0 and p.role("predictor").trainable
    with pytest.raises(PlanError, match="rollout.n=4 must equal steering.predictor.n_samples=8"):
        plan("steering.enable=true", "steering.feature_idxs=[1]", "steering.predictor.enable=true",
             "steering.predictor.n_samples=8")


def test_memory_estimate_reads_the_plan():
    cfg = load_experiment_config(LLAMA_70B, ["actor.fused_loss=off", "ref.offload=false"])
    p = resolve_plan(cfg, world_size=64, device="cuda")
    inputs = mp.inputs_from_plan(p)
    assert (inputs.dp, inputs.num_microbatches, inputs.loss_path, inputs.ref_resident) == (2, 128, "unfused", True)
    assert inputs.rollout_seqs == 256 and inputs.seq_len == 1024 + 2048
    est = mp.estimate(inputs)
    assert p.memory.peak_gib == pytest.approx(est.peak / mp.GiB) and p.memory.peak_phase == est.peak_phase
    offloaded = mp.inputs_from_plan(resolve_plan(load_experiment_config(LLAMA_70B),
                                                 world_size=64, device="cuda"))
    assert (offloaded.ref_enable, offloaded.ref_resident, offloaded.loss_path) == (True, False, "fused")


def test_to_dict_and_json(tmp_path):
    p = plan("actor.mini_batch_size=16", world_size=2)
    d = p.to_dict()
    assert d["batch"]["optimizer_steps_per_rollout"] == 2 and d["roles"][0]["name"] == "actor"
    p.write_json(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["layout"]["dp"] == 2


@pytest.mark.parametrize("extra,key", [(["critic.enable=true", "algos.adv_estimator=gae"], "critic.enable"),
                                       (["gad.enable=true"], "gad.enable"),
                                       (["token_weights.source=vgr"], "token_weights.source=vgr")])
def test_vpp_refuses_the_single_chunk_roles_by_name(extra, key):
    with pytest.raises(PlanError, match=rf"model.vpp=2 with {key}"):
        plan("model.pp=2", "model.vpp=2", *extra, world_size=2)


def test_vpp_refuses_micro_batch_counts_the_interleaved_schedule_cannot_run():
    # 8 prompts x 4 = 32 samples at DP=1; micro-batch 32 -> 1 micro-batch, not a multiple of pp=2
    with pytest.raises(PlanError, match=r"model.vpp=2: 1 micro-batches per optimizer step .* model.pp=2"):
        plan("model.pp=2", "model.vpp=2", "actor.micro_batch_size=32", world_size=2)
    with pytest.raises(PlanError, match=r"actor.max_tokens_per_microbatch > 0"):
        plan("model.pp=2", "model.vpp=2", "actor.max_tokens_per_microbatch=4096", world_size=2)
    assert plan("model.pp=2", "model.vpp=2", "actor.micro_batch_size=4", world_size=2).layout.vpp == 2


def test_rollout_phase_memory_counts_the_training_state_offload():
    """actor.offload_during_rollout: the rollout phase holds no gradients / optimizer state
    (`state`), and no actor weights either (`state_and_weights`)."""
    base = ["rollout.engine=vllm", "model.dtype=bfloat16"]
    est = {mode: mp.estimate_stage(mp.inputs_from_plan(plan(*base, f"actor.offload_during_rollout={mode}",
                                                            device="cuda", shape="llama3-8b")), "last")
           for mode in ("none", "state", "state_and_weights")}
    c = est["none"].components
    none, state, both = (est[m].phases["rollout"] for m in ("none", "state", "state_and_weights"))
    assert none - state == pytest.approx(c["actor grads"] + c["optimizer"])
    assert state - both == pytest.approx(c["actor weights"])


def test_offload_during_rollout_is_refused_for_the_frozen_predictor_llm():
    from types import SimpleNamespace as NS

    from megatron_rl.plan.passes import resolve_rollout_offload

    def cfg(mode):
        return NS(rollout=NS(engine="vllm", colocate=True), actor=NS(offload_during_rollout=mode),
                  steering=NS(enable=True, predictor=NS(enable=True)))
    assert resolve_rollout_offload(cfg(None), "cuda") == "none"          # nothing to move: the LLM is frozen
    with pytest.raises(PlanError, match=r"actor.offload_during_rollout=state with steering.predictor.enable"):
        resolve_rollout_offload(cfg("state"), "cuda")


def test_plan_engine_logprobs_only_when_read():
    """rollout.engine_logprobs: auto asks the engine only when something reads rollout_logprob."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import PlanError, resolve_plan

    def plan(*over):
        return resolve_plan(load_experiment_config(None, list(over)), world_size=1, device="cpu").rollout

    assert plan().engine_logprobs is False
    assert plan("rollout.logprob_mode=rollout").engine_logprobs is True
    assert plan("rollout.engine_logprobs=always").engine_logprobs is True
    with pytest.raises(PlanError, match="rollout.engine_logprobs=never, but rollout.logprob_mode=rollout"):
        plan("rollout.engine_logprobs=never", "rollout.logprob_mode=rollout")
    with pytest.raises(PlanError, match="auto\\|always\\|never"):
        plan("rollout.engine_logprobs=sometimes")
