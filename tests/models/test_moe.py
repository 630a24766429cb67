"""Mixture-of-experts models (Qwen3-MoE, Mixtral) on Megatron's MoE layer: logits equal
transformers' at TP=1; the HF config maps onto Megatron's routing options; unsupported
fields are errors naming them."""
import json

import pytest
import torch

from megatron_rl.models.parity import compare_logits
from tests.helpers import make_tiny_hf


def _ids():
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :5] = 0      # left padding
    return ids, am


@pytest.mark.parametrize("spec", ["local", "sdpa"])
@pytest.mark.parametrize("family,extra", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
                                          ("mixtral", {})])
def test_moe_logits_match_transformers(tmp_path, spec, family, extra):
    hf = make_tiny_hf(tmp_path / "hf", family, tie=False, **extra)
    res = compare_logits(hf, *_ids(), layer_spec=spec)
    assert res["max_abs_diff"] < 1e-4, res


def test_qwen3_moe_arch_marks_dense_layers(tmp_path):
    from megatron_rl.models.hf_config import arch_from_hf_config
    arch = arch_from_hf_config(make_tiny_hf(tmp_path / "hf", "qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[1]))
    assert (arch.num_experts, arch.moe_top_k, arch.moe_ffn_hidden_size) == (4, 2, 48)
    assert arch.moe_layers == [1, 0, 1, 1] and arch.qk_layernorm and arch.moe_norm_topk_prob


def test_decoder_sparse_step_gives_the_hf_layer_pattern():
    from megatron_rl.models.hf_config import moe_fields_from_hf
    cfg = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "decoder_sparse_step": 2}
    assert moe_fields_from_hf(cfg, "qwen3_moe", 4)["moe_layers"] == [0, 1, 0, 1]


def test_moe_routing_options_follow_the_hf_config(tmp_path):
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.models.moe import moe_transformer_kwargs
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import init_distributed

    init_distributed()
    qwen = arch_from_hf_config(make_tiny_hf(tmp_path / "q", "qwen3_moe", norm_topk_prob=False))
    mix = arch_from_hf_config(make_tiny_hf(tmp_path / "m", "mixtral"))
    kq = moe_transformer_kwargs(qwen)
    assert kq["moe_router_pre_softmax"] and kq["moe_router_dtype"] == "fp32"
    assert kq["moe_aux_loss_coeff"] == 0.0 and kq["moe_z_loss_coeff"] is None
    assert kq["moe_router_load_balancing_type"] == "none" and kq["moe_expert_capacity_factor"] is None
    assert kq["moe_token_dispatcher_type"] == "alltoall"
    km = moe_transformer_kwargs(mix, MoEConfig(aux_loss_coef=0.01, z_loss_coef=0.001))
    assert not km["moe_router_pre_softmax"] and km["moe_layer_freq"] == [1, 1, 1, 1]
    assert (km["moe_router_load_balancing_type"], km["moe_aux_loss_coeff"], km["moe_z_loss_coeff"]) == \
        ("aux_loss", 0.01, 0.001)


@pytest.mark.parametrize("family,field,value", [("mixtral", "sliding_window", 64),
                                                ("mixtral", "router_jitter_noise", 0.1),
                                                ("qwen3_moe", "mlp_only_layers", [7]),
                                                ("qwen3_moe", "attention_bias", True)])
def test_unsupported_moe_fields_are_named(tmp_path, family, field, value):
    from megatron_rl.models.hf_config import arch_from_hf_config
    make_tiny_hf(tmp_path / "hf", family)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[field] = value
    with pytest.raises(ValueError, match=field):
        arch_from_hf_config(cfg)


def test_moe_config_refuses_bad_values_by_key():
    from megatron_rl.models.moe_config import MoEConfig
    with pytest.raises(ValueError, match="model.moe.aux_loss_coef"):
        MoEConfig(aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match="model.moe.token_dispatcher"):
        MoEConfig(token_dispatcher="flex")
