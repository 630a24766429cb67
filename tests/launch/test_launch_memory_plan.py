"""The memory planner's arithmetic on hand-computed cases, and its suggestions."""
from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_rl.plan import memory as mp

GiB = mp.GiB
# Korthikanti's setting: MHA, 4h GeLU MLP, dropout. h=64, a=4, d=16, ffn=256.
KORTH = mp.Shape(num_layers=8, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, ffn_hidden_size=256,
                 vocab_size=1000, gated_mlp=False)
S, B = 32, 2


def korth(tp=1, sp=False, scores=True):
    return mp.layer_activation_bytes(KORTH, S, B, tp, sp, scores=scores, dropout=True)


@pytest.mark.parametrize("name,params", [("llama3-70b", 70_553_706_496), ("qwen2-72b", 72_706_203_648),
                                         ("llama3-8b", 8_030_261_248), ("llama-1b", 1_235_814_400),
                                         ("smollm2-135m", 134_515_008)])
def test_preset_parameter_counts_match_the_published_models(name, params):
    assert mp.total_params(mp.PRESETS[name]) == params


def test_activation_formula_is_korthikanti_without_parallelism():
    # s*b*h*(34 + 5*a*s/h) = 32*2*64*(34 + 10)
    assert korth() == 32 * 2 * 64 * 44


def test_tensor_parallel_without_sp_keeps_10sbh_replicated():
    # s*b*h*(10 + 24/t + 5as/(ht)), t = 4
    assert korth(tp=4) == pytest.approx(32 * 2 * 64 * (10 + 24 / 4 + 10 / 4))


def test_sequence_parallel_divides_everything_by_tp():
    assert korth(tp=4, sp=True) == pytest.approx(32 * 2 * 64 * 44 / 4)


def test_selective_recompute_drops_the_score_term():
    assert korth(scores=False) == 32 * 2 * 64 * 34


def test_gqa_swiglu_without_dropout_counts_each_saved_tensor():
    shape = mp.Shape(2, 64, 4, 1, 16, 128, 100)        # a=4, kv=1, gated MLP
    got = mp.layer_activation_bytes(shape, 10, 1, 1, False, scores=False, dropout=False, fused_swiglu=True)
    # per token: 8h (norm/QKV/MLP inputs) + Q 2h + K,V 4*kv*d + attn out 2h + fc1 4f + act 2f
    per_token = 8 * 64 + 2 * 64 + 4 * 16 + 2 * 64 + 4 * 128 + 2 * 128
    assert got == per_token * 10
    unfused = mp.layer_activation_bytes(shape, 10, 1, 1, False, scores=False, dropout=False, fused_swiglu=False)
    assert unfused - got == 2 * 128 * 10                # silu(gate) kept too


def inputs(**kw):
    base = dict(shape=KORTH, gpus=1, gpu_mem_gib=80, dtype="bfloat16", micro_batch=B, seq_len=S,
                num_microbatches=8, flash_attention=False, dropout=True, fused_swiglu=True,
                engine="vllm", colocate=False, overhead_gib=0.0)
    base.update(kw)
    return mp.PlanInputs(**base)


def test_first_stage_holds_pp_microbatches_under_1f1b():
    per_layer = korth(tp=1)
    assert mp.activation_bytes(inputs(gpus=4, pp=4)) == pytest.approx(per_layer * 2 * 4)   # 8/4 layers x 4 in flight
    assert mp.activation_bytes(inputs(gpus=4, pp=4, num_microbatches=2)) == pytest.approx(per_layer * 2 * 2)


def test_interleaving_adds_korthikanti_factor():
    per_layer = korth(tp=1)
    got = mp.activation_bytes(inputs(gpus=4, pp=4, vpp=2))
    assert got == pytest.approx(per_layer * 8 * (1 + 3 / 8))


def test_full_recompute_keeps_layer_inputs_plus_one_layer():
    got = mp.activation_bytes(inputs(recompute="full", num_microbatches=1))
    assert got == pytest.approx(8 * 2 * S * B * 64 + korth())


def test_static_bytes_of_bf16_with_distributed_optimizer():
    p = inputs(gpus=4)                         # DP = 4
    n = mp.stage_params(KORTH, 1, 1, "only")
    plan = mp.estimate(p)
    assert plan.components["actor weights"] == 2 * n
    assert plan.components["actor grads"] == 4 * n
    assert plan.components["optimizer"] == 12 * n / 4


def test_fp32_params_need_no_master_copy():
    plan = mp.estimate(inputs(dtype="float32", distributed_optimizer=False))
    n = mp.stage_params(KORTH, 1, 1, "only")
    assert plan.components["optimizer"] == 8 * n and plan.components["actor grads"] == 4 * n


def test_stage_params_split_embedding_and_head_over_pp():
    layer = mp.layer_params(KORTH, 1)
    emb = 1000 * 64
    assert mp.stage_params(KORTH, 1, 2, "first") == 4 * layer + emb
    assert mp.stage_params(KORTH, 1, 2, "last") == 4 * layer + emb + 64
    assert mp.stage_params(KORTH, 1, 2, "middle") == 4 * layer


def test_logits_bytes_per_loss_path():
    elems = S * B * 1000
    assert mp.logits_bytes(inputs(loss_path="unfused")) == elems * (2 + 4 + 4)
    assert mp.logits_bytes(inputs(loss_path="fused", micro_batch=1)) == S * 1000 * 2
    with pytest.raises(ValueError, match="loss_path must be one of"):
        mp.estimate(inputs(loss_path="linear"))              # the trainer has no LM-head-fused path


def test_kv_cache_bytes():
    s = mp.PRESETS["llama3-70b"]
    # 2 (K,V) * 80 layers * 8/8 kv heads * 128 * 1000 tokens * 2 B
    assert mp.kv_cache_bytes(s, 8, 1, 1000) == 2 * 80 * 1 * 128 * 1000 * 2


def test_train_phase_is_the_sum_of_its_parts():
    plan = mp.estimate(inputs(overhead_gib=2.0, ref_enable=True, ref_resident=True))
    c = plan.components
    expected = sum(c[k] for k in ("actor weights", "actor grads", "optimizer", "reference", "activations",
                                  "logits + loss", "grad transient", "overhead"))
    assert c["grad transient"] == 1000 * 64 * 2        # the embedding is the largest weight, bf16
    assert plan.phases["train"] == pytest.approx(expected)
    assert plan.train_allocated == pytest.approx(expected - 2 * GiB)


def test_offloaded_reference_only_counts_in_the_logprob_phase():
    on = mp.estimate(inputs(ref_enable=True, ref_resident=True))
    off = mp.estimate(inputs(ref_enable=True, ref_resident=False))
    ref = on.components["reference"]
    assert on.phases["train"] - off.phases["train"] == pytest.approx(ref)
    assert on.phases["logprob"] == pytest.approx(off.phases["logprob"])


def test_colocated_vllm_reserves_its_share_during_rollout():
    plan = mp.estimate(inputs(engine="vllm", colocate=True, gpu_memory_utilization=0.5, gpu_mem_gib=80))
    assert plan.components["rollout engine"] == 40 * GiB
    static = sum(plan.components[k] for k in ("actor weights", "actor grads", "optimizer"))
    assert plan.phases["rollout"] == pytest.approx(static + 40 * GiB)


def test_70b_does_not_fit_one_gpu_and_suggests_nothing_on_one():
    p = inputs(shape=mp.PRESETS["llama3-70b"], gpus=1, seq_len=2048, micro_batch=1, flash_attention=True,
               dropout=False)
    assert not mp.estimate(p).fits
    assert mp.suggest(p) == []


def test_suggestion_is_the_smallest_model_parallel_layout_that_fits():
    s = mp.PRESETS["llama3-8b"]
    p = inputs(shape=s, gpus=8, gpu_mem_gib=40, seq_len=4096, micro_batch=1, num_microbatches=4,
               flash_attention=True, dropout=False, overhead_gib=2.5)
    plans = mp.suggest(p, limit=10)
    assert plans, "an 8B model fits 8 x 40 GiB somehow"
    best = plans[0].inputs
    assert all(pl.fits for pl in plans)
    sizes = [pl.inputs.tp * pl.inputs.pp for pl in plans]
    assert sizes == sorted(sizes)
    # nothing with a smaller model-parallel size fits
    for q in mp.candidates(p):
        if q.tp * q.pp < best.tp * best.pp:
            q.num_microbatches = max(1, -(-p.num_microbatches * p.dp // q.dp))
            assert not mp.estimate(q).fits
    # TP=1 PP=1 would need the whole 8B model's states on one 40 GiB GPU: no
    assert best.tp * best.pp > 1


def test_suggestions_respect_kv_heads_and_node_size():
    p = inputs(shape=mp.PRESETS["smollm2-135m"], gpus=16)      # 3 KV heads: only TP=1
    assert {q.tp for q in mp.candidates(p)} == {1}
    p = inputs(shape=mp.PRESETS["llama3-8b"], gpus=16)
    assert max(q.tp for q in mp.candidates(p, gpus_per_node=4)) == 4


def test_invalid_layout_names_the_constraint():
    with pytest.raises(ValueError, match="num_kv_heads=4 is not divisible by tp=8"):
        mp.estimate(inputs(gpus=8, tp=8))
    with pytest.raises(ValueError, match="gpus=6 is not divisible"):
        mp.estimate(inputs(gpus=6, pp=4))


def test_unknown_shape_spec_lists_presets():
    with pytest.raises(ValueError, match="llama3-70b"):
        mp.resolve_shape("no-such-model")


def test_shape_from_hf_config_file(tmp_path):
    import json
    from megatron_rl.models.hf_config import arch_to_hf_config
    from megatron_rl.models import ModelArch
    arch = ModelArch("llama", 2, 64, 4, 2, 16, 128, 96, 256, 10000.0, 1e-5, True, False)
    (tmp_path / "config.json").write_text(json.dumps(arch_to_hf_config(arch)))
    shape = mp.resolve_shape(str(tmp_path))
    assert (shape.num_layers, shape.num_kv_heads, shape.tie_word_embeddings) == (2, 2, True)


def test_last_stage_keeps_the_head_inputs():
    p = inputs(loss_path="fused", micro_batch=1)
    plan = mp.estimate(p)
    # final norm input + LM head input, 2 B each per hidden element, no SP
    assert plan.components["logits + loss"] == mp.logits_bytes(p) + S * 1 * 64 * 2 * 2
