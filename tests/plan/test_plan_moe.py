"""Run plan and memory planner for mixture-of-experts models: model.ep / model.etp are
accepted for MoE shapes and refused (naming the key) where Megatron cannot honour them;
the MoE memory terms equal hand arithmetic; the Qwen3 presets have their public sizes."""
import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import PlanError, resolve_plan
from megatron_rl.plan import memory as mp

BASE = ["data.train_batch_size=8", "rollout.n=4"]
# 2 layers (layer 0 MoE, layer 1 dense), hidden 8, 2 heads (1 KV) of 4, ffn 16, 4 experts top-2 of ffn 6.
TINY = mp.Shape(2, 8, 2, 1, 4, 16, 32, qk_layernorm=True, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=6,
                moe_layers=(1, 0))


def plan(*overrides, world_size=1, device="cpu", shape=None):
    return resolve_plan(load_experiment_config(None, BASE + list(overrides)), world_size=world_size, device=device,
                        shape=shape)


@pytest.mark.parametrize("world,overrides,shape,match", [
    (8, ["model.ep=2"], "qwen3-8b", r"model.ep=2: expert parallelism needs a mixture-of-experts model"),
    (8, ["model.etp=2"], "llama3-8b", r"model.etp=2: expert parallelism needs a mixture-of-experts model"),
    (6, ["model.ep=3"], "qwen3-30b-a3b", r"model.ep=3: num_experts=128 is not divisible by it"),
    (4, ["model.ep=8"], "qwen3-30b-a3b", r"world size 4 is not divisible by model.etp \* model.ep \* model.pp "
                                         r"= 1 \* 8 \* 1 = 8"),
    (8, ["model.ep=2", "model.pp=2", "model.etp=4"], "qwen3-30b-a3b", r"model.etp \* model.ep \* model.pp = 4 \* 2"),
    (10, ["model.ep=2", "model.etp=5"], "qwen3-30b-a3b", r"model.etp=5: moe_ffn_hidden_size=768"),
])
def test_expert_parallel_refusals_name_the_key(world, overrides, shape, match):
    with pytest.raises(PlanError, match=match):
        plan(*overrides, world_size=world, shape=shape)


def test_expert_parallel_layout_is_accepted_for_moe():
    p = plan("model.ep=8", "model.tp=2", "model.etp=1", world_size=16, shape="qwen3-30b-a3b", device="cuda")
    assert (p.layout.ep, p.layout.etp, p.layout.dp) == (8, 1, 8)
    assert p.memory is not None and p.memory.components_gib["moe dispatch"] > 0
    assert "EP=8" in p.summary()


def test_qwen3_presets_have_their_public_sizes():
    assert round(mp.total_params(mp.PRESETS["qwen3-8b"]) / 1e9, 2) == 8.19
    s30, s235 = mp.PRESETS["qwen3-30b-a3b"], mp.PRESETS["qwen3-235b-a22b"]
    assert (round(mp.total_params(s30) / 1e9, 1), round(mp.active_params(s30) / 1e9, 1)) == (30.5, 3.4)
    assert (round(mp.total_params(s235) / 1e9), round(mp.active_params(s235) / 1e9)) == (235, 22)


def test_moe_params_per_rank_by_hand():
    assert mp.layer_params(TINY, 1) == 16 * 8 + 8 * 8 + 3 * 8 * 16 + 2 * 8 + 2 * 4        # 600
    assert mp.layer_params(TINY, 1, sparse=True) == 192 + 24 + 4 * 8                     # router, no dense MLP
    assert mp.stage_expert_params(TINY, 2, 1, 1, "only") == 2 * 3 * 8 * 6                # 2 local experts
    assert mp.stage_expert_params(TINY, 2, 2, 1, "only") == 2 * 3 * 8 * 6 // 2           # split over etp
    assert mp.stage_expert_params(TINY, 1, 1, 2, "last") == 0                            # layer 1 is dense


def test_moe_memory_terms_by_hand():
    """4 GPUs, EP=2 (expert DP 2, dense DP 4), bf16, distributed optimizer, 10 tokens, flash attention."""
    p = mp.PlanInputs(shape=TINY, gpus=4, ep=2, dtype="bfloat16", distributed_optimizer=True, seq_len=10,
                      micro_batch=1, engine="native", rollout_seqs=1, overhead_gib=0.0)
    plan = mp.estimate(p)
    c = plan.components
    dense, experts = 600 + 248 + 256 + 8 + 256, 288            # layers + embedding + final norm + LM head
    assert c["actor weights"] == (dense + experts) * 2
    assert c["actor grads"] == (dense + experts) * 4
    assert c["optimizer"] == dense * 12 / 4 + experts * 12 / 2
    # per token: attention 8h + 2ad + 4kvd + 2ad = 112; dense MLP 2*2f + 2f = 96;
    # MoE: router 8E = 32, copies 4hk = 64, experts 6 f_moe k = 72
    assert c["activations"] == ((112 + 96) + (112 + 32 + 64 + 72)) * 10
    assert c["moe dispatch"] == 2 * 10 * 2 * 8 * 2
    assert plan.phases["train"] == (c["actor weights"] + c["actor grads"] + c["optimizer"] + c["activations"]
                                    + c["logits + loss"] + c["grad transient"] + c["moe dispatch"])


def test_etp_tp_split_routed_activations():
    """TP=2, etp=1: each GPU gets half the token copies (whole experts); etp=2: all copies, half experts."""
    base = dict(dropout=False, act_bytes=2, scores=False, sparse=True)
    one = mp.layer_activation_bytes(TINY, 10, 1, 2, False, etp=1, **base)
    two = mp.layer_activation_bytes(TINY, 10, 1, 2, False, etp=2, **base)
    assert two - one == 10 * 4 * 8 * 2 * (2 - 1) / 2                                     # copies term only


@pytest.mark.parametrize("name,world,gpu_mem,ep", [("qwen3_8b_grpo.yaml", 8, 80, 1),
                                                   ("qwen3_30b_a3b_grpo.yaml", 8, 141, 8),
                                                   ("qwen3_235b_a22b_grpo.yaml", 64, 141, 32)])
def test_qwen3_configs_plan_and_fit_their_cluster(name, world, gpu_mem, ep):
    from pathlib import Path
    cfg = load_experiment_config(Path(__file__).resolve().parents[2] / "configs" / name)
    p = resolve_plan(cfg, world_size=world, device="cuda", gpu_mem_gib=gpu_mem)
    assert p.layout.ep == ep and p.model.shape is not None and p.memory.fits, p.summary()


def test_moe_options_on_a_dense_model_are_refused_by_name():
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import PlanError, resolve_plan

    cfg = load_experiment_config(None, ["model.moe.aux_loss_coef=0.01"])
    with pytest.raises(PlanError, match=r"model.moe.aux_loss_coef=0.01: the model is dense"):
        resolve_plan(cfg, world_size=1, device="cuda", shape="llama3-8b")
