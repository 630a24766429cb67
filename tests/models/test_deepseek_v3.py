"""DeepSeek-V3 (multi-latent attention, first layer dense, sigmoid routing with the aux-free
expert bias over 2 expert groups, a shared expert): logits equal transformers' (default rope,
q_lora_rank null, YaRN), HF -> Megatron (EP=2) -> HF is bit-exact, the native engine's greedy
tokens equal transformers' generate, the expert bias moves only by Megatron's sign update,
and fields we cannot reproduce are refused by name."""
import json
import types

import pytest
import torch

from tests.helpers import assert_tensors_bit_exact, convert_round_trip, make_tiny_hf, write_word_tokenizer

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dsv3") / "hf"
    make_tiny_hf(d, "deepseek_v3", tie=False)
    write_word_tokenizer(d, "The capital of France is def fibonacci(n): return 1 + = 2, 2 =".split())
    return str(d)


def _cfg(hf_dir, **over):
    with open(f"{hf_dir}/config.json") as f:
        return {**json.load(f), **over}


def test_arch_fields_and_hf_config_round_trip(hf_dir):
    from megatron_rl.models.hf_config import arch_from_hf_config, arch_to_hf_config

    arch = arch_from_hf_config(hf_dir)
    assert (arch.family, arch.moe_layers, arch.num_experts, arch.moe_top_k) == ("deepseek_v3", [0, 1, 1], 8, 4)
    assert (arch.q_lora_rank, arch.kv_lora_rank, arch.qk_nope_head_dim, arch.qk_rope_head_dim, arch.v_head_dim) == \
        (24, 16, 8, 8, 12)
    assert (arch.moe_num_groups, arch.moe_group_topk, arch.moe_scaling_factor, arch.moe_shared_ffn_hidden_size) == \
        (2, 2, 2.5, 32)
    assert arch_from_hf_config(arch_to_hf_config(arch)) == arch
    yarn = arch_from_hf_config(_cfg(hf_dir, rope_parameters=YARN, q_lora_rank=None))
    assert yarn.yarn["factor"] == 4.0 and yarn.q_lora_rank is None
    assert arch_from_hf_config(arch_to_hf_config(yarn)) == yarn


@pytest.mark.parametrize("field,value", [
    ("rope_interleave", False), ("norm_topk_prob", False), ("attention_bias", True), ("num_key_value_heads", 2),
    ("topk_group", 1),            # 4 // 1 = 4 experts per group score, transformers uses the top 2
    ("scoring_func", "softmax"), ("topk_method", "greedy"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}),
])
def test_unsupported_fields_are_refused_by_name(hf_dir, field, value):
    from megatron_rl.models.hf_config import arch_from_hf_config

    with pytest.raises(ValueError, match=field):
        arch_from_hf_config(_cfg(hf_dir, **{field: value}))


def test_mtp_layers_dropped_and_non_local_specs_refused(hf_dir, caplog):
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.models.layer_specs import resolve_layer_spec_name

    with caplog.at_level("INFO"):
        arch_from_hf_config(_cfg(hf_dir, num_nextn_predict_layers=1))
    assert "num_nextn_predict_layers=1 MTP layer(s) dropped" in caplog.text
    mla = types.SimpleNamespace(multi_latent_attention=True)
    assert resolve_layer_spec_name("auto", mla) == "local"
    for name in ("te", "sdpa"):
        with pytest.raises(ValueError, match="model.layer_spec"):
            resolve_layer_spec_name(name, mla)


def test_check_logits_cli(hf_dir, capsys):
    from megatron_rl.models.parity import main

    assert main(hf_dir) == 0
    out = capsys.readouterr().out
    assert "OK" in out, out


def _amplified(tmp_path, **over):
    """Attention projections x6 so the softmax is far from uniform (YaRN's scale then matters)."""
    import transformers

    d = make_tiny_hf(tmp_path / "hf", "deepseek_v3", tie=False, **over)
    m = transformers.AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if any(k in n for k in ("q_b_proj", "q_proj", "kv_b_proj", "kv_a_proj")):
                p.mul_(6.0)
    m.save_pretrained(d)
    return d


@pytest.mark.parametrize("over", [dict(q_lora_rank=None), dict(rope_parameters=YARN)], ids=["no_q_lora", "yarn"])
def test_logits_match_transformers(tmp_path, over):
    import transformers

    from megatron_rl.models.parity import compare_logits

    d = _amplified(tmp_path, **over)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))   # 40 > YaRN's original 16
    am = torch.ones_like(ids)
    am[1, :5] = 0
    res = compare_logits(d, ids, am)
    assert res["max_abs_diff"] < 1e-3 * max(1.0, res["logit_scale"]), res
    if "rope_parameters" in over:          # YaRN really changes the logits here: the check is not vacuous
        plain = transformers.AutoModelForCausalLM.from_pretrained(d, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 10000.0})
        yarn = transformers.AutoModelForCausalLM.from_pretrained(d)
        with torch.no_grad():
            gap = (plain(input_ids=ids[:1]).logits - yarn(input_ids=ids[:1]).logits).abs().max().item()
        assert gap > 20 * res["max_abs_diff"], (gap, res)


def test_native_engine_greedy_equals_transformers_generate(hf_dir):
    import transformers

    from megatron_rl.data.batch import Batch
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams

    ids = torch.randint(2, 90, (3, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    init_distributed()
    try:
        engine = NativeEngine(load_checkpoint(hf_dir, layer_spec="local"),
                              types.SimpleNamespace(eos_token_id=95, pad_token_id=0))
        res = engine.generate(Batch({"prompt_ids": ids, "prompt_mask": mask}, [{"uid": str(i)} for i in range(3)]),
                              SamplingParams(n=1, max_new_tokens=8, greedy=True))
    finally:
        destroy_distributed()
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval().generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=95, pad_token_id=0)
    assert torch.equal(res["response_ids"], ref[:, 5:])


def _sgd_step(hf_dir, ids, rate):
    """One SGD step through Megatron's finalize_model_grads; (HF tensors before, after, tokens per expert)."""
    import torch.nn.functional as F
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.trainer.ddp import wrap_ddp_chunks

    init_distributed()
    try:
        model = load_checkpoint(hf_dir, layer_spec="local", moe=MoEConfig(expert_bias_update_rate=rate))
        assert not [n for n, _ in model.named_parameters() if "expert_bias" in n]      # a buffer: no optimizer
        before = {k: v.clone() for k, v in iter_hf_weights(model)}    # TP=1 export aliases the weights
        ddp = wrap_ddp_chunks(model, use_dist_opt=False)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=0.5), ddp)
        with torch.no_grad():
            gpt_forward(ddp[0], ids)                   # no-grad forwards (log-probs) do not count tokens
        loss = F.cross_entropy(gpt_forward(ddp[0], ids)[:, :-1, :96].reshape(-1, 96), ids[:, 1:].reshape(-1))
        loss.backward()
        routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]
        tokens = [r.local_tokens_per_expert.clone() for r in routers]
        finalize_model_grads(ddp)
        assert opt.step()[0]
        return before, dict(iter_hf_weights(model)), tokens
    finally:
        destroy_distributed()


@pytest.mark.parametrize("rate", [1e-3, 0.0])
def test_expert_bias_follows_megatrons_sign_update(hf_dir, rate):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    before, after, tokens = _sgd_step(hf_dir, ids, rate)
    assert len(tokens) == 2 and all(int(t.sum()) == ids.numel() * 4 for t in tokens)    # top-4 per grad token
    for layer, t in zip((1, 2), tokens):
        bias = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        want = before[bias] + torch.sign(t.mean() - t) * rate
        assert torch.allclose(after[bias], want, atol=1e-7, rtol=0), (after[bias] - before[bias], t)
        gate = f"model.layers.{layer}.mlp.gate.weight"
        assert not torch.equal(after[gate], before[gate])                    # the router itself trains
    assert rate == 0 or not torch.equal(after["model.layers.1.mlp.gate.e_score_correction_bias"],
                                        before["model.layers.1.mlp.gate.e_score_correction_bias"])


@pytest.mark.multiproc
def test_hf_to_mcore_ep2_to_hf_is_bit_exact(hf_dir, tmp_path):
    """The converter: hf-to-mcore in two gloo processes at EP=2, mcore-to-hf here (EP=1)."""
    import transformers

    ref, got = convert_round_trip(hf_dir, tmp_path, ep=2)
    assert_tensors_bit_exact(ref, got)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    a = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(input_ids=ids).logits
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.slow   # TP=1 check-logits and the EP=2 round trip stay in CI
@pytest.mark.multiproc
def test_check_logits_cli_tp2(hf_dir, capsys):
    """TP=2 (two gloo processes): MLA's column-parallel down projections are split and gathered."""
    from megatron_rl.models.parity import main

    assert main(hf_dir, tp=2) == 0
    assert "(TP=2)" in capsys.readouterr().out


def test_run_plan_states_the_local_spec_on_gpu(hf_dir):
    """The plan resolves layer_spec auto as the builder does for MLA (local), and refuses sdpa/te."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import PlanError, resolve_plan

    base = [f"model.path={hf_dir}", "model.dtype=bfloat16", "rollout.engine=native"]
    plan = resolve_plan(load_experiment_config(None, base), world_size=1, device="cuda")
    assert plan.model.layer_spec_choice == "local" and "multi-latent" in plan.model.layer_spec_reason
    with pytest.raises(PlanError, match="model.layer_spec='sdpa' is not supported with multi-latent"):
        resolve_plan(load_experiment_config(None, base + ["model.layer_spec=sdpa"]), world_size=1, device="cuda")
