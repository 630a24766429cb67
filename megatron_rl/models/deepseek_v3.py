"""DeepSeek-V3 (`DeepseekV3ForCausalLM`) on Megatron-Core 0.16.1: multi-latent attention
(`MLATransformerConfig` + the local spec's `MLASelfAttention`), the first
`first_k_dense_replace` layers dense, then MoE layers with sigmoid routing, the aux-free
expert bias (`e_score_correction_bias` <-> `router.expert_bias`, a buffer), group-limited
top-k, `routed_scaling_factor` and shared experts.

What must match transformers exactly, and where it does not we refuse the field by name:
- RoPE: Megatron's MLA de-interleaves the rope dims of q and k (same permutation on both,
  so q.k equals transformers' `rope_interleave: true`); `rope_interleave: false` is refused.
- Routing: Megatron's sigmoid router always renormalises the top-k scores (k > 1), so
  `norm_topk_prob: false` is refused; Megatron picks groups by the sum of the top
  `k // topk_group` scores per group, transformers by the top 2, so `n_group > 1` needs
  `num_experts_per_tok // topk_group == 2` (true for DeepSeek-V3: 8 // 4).
- MTP (`num_nextn_predict_layers`): transformers builds no MTP layers and ignores their
  weights at inference; we do the same (dropped, with a log line), so RL trains the main
  model only.
"""
from __future__ import annotations

import logging

from megatron_rl.models.hf_config import ModelArch

log = logging.getLogger(__name__)

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, YaRN parameters or None) from `rope_parameters` (transformers 5) or `rope_scaling`."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(f"config.json field 'rope_scaling' / 'rope_parameters' rope_type={kind!r} is not "
                         "supported for DeepseekV3ForCausalLM (only default or yarn)")
    extra = sorted(set(params) - set(YARN_KEYS) - {"rope_type", "type", "rope_theta"})
    if extra or params.get("attention_factor") is not None or params.get("truncate", True) is not True:
        raise ValueError(f"config.json field 'rope_parameters' (yarn) keys {extra or ['attention_factor/truncate']} "
                         "are not supported (Megatron's YarnRotaryEmbedding has no such option)")
    yarn = dict(factor=float(params["factor"]),
                original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                                cfg.get("max_position_embeddings", 4096))),
                beta_fast=float(params.get("beta_fast", 32)), beta_slow=float(params.get("beta_slow", 1)),
                mscale=float(params.get("mscale", 1.0)), mscale_all_dim=float(params.get("mscale_all_dim", 0.0)))
    return theta, yarn


def deepseek_v3_arch_from_hf(cfg: dict) -> ModelArch:
    """`ModelArch` of a DeepseekV3ForCausalLM config.json; unsupported fields raise, naming them."""
    def refuse(field, why):
        raise ValueError(f"config.json field {field!r} = {cfg.get(field)!r} is not supported for "
                         f"DeepseekV3ForCausalLM: {why}")

    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only 'silu'")
    if cfg.get("attention_bias", False):
        refuse("attention_bias", "Megatron's MLA projections have no bias")
    if not cfg.get("rope_interleave", True):
        refuse("rope_interleave", "Megatron's MLA always treats the rope dims as interleaved pairs")
    if not cfg.get("norm_topk_prob", True):
        refuse("norm_topk_prob", "Megatron's sigmoid router always renormalises the top-k scores")
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        refuse("scoring_func", "only 'sigmoid'")
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
        refuse("topk_method", "only 'noaux_tc' (sigmoid + e_score_correction_bias)")
    heads = cfg["num_attention_heads"]
    if cfg.get("num_key_value_heads", heads) != heads:
        refuse("num_key_value_heads", f"MLA has one key/value per head: must equal num_attention_heads={heads}")
    layers = int(cfg["num_hidden_layers"])
    experts = int(cfg["n_routed_experts"])
    k = int(cfg["num_experts_per_tok"])
    groups, group_topk = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if experts % groups:
        refuse("n_group", f"must divide n_routed_experts={experts}")
    if groups > 1 and k // group_topk != 2:
        refuse("topk_group", f"with n_group={groups} Megatron scores a group by its top num_experts_per_tok // "
                             f"topk_group = {k // group_topk} experts, transformers by its top 2")
    if groups > 1 and experts // groups < 2:
        refuse("n_group", "transformers scores a group by its top 2 experts: needs >= 2 experts per group")
    if group_topk > groups:
        refuse("topk_group", f"must be <= n_group={groups}")
    dense = int(cfg.get("first_k_dense_replace", 0))
    if not 0 <= dense <= layers:
        refuse("first_k_dense_replace", f"must be in 0..num_hidden_layers={layers}")
    if cfg.get("num_nextn_predict_layers"):
        log.info("DeepseekV3ForCausalLM: num_nextn_predict_layers=%s MTP layer(s) dropped (transformers ignores "
                 "them at inference; RL trains the main model)", cfg["num_nextn_predict_layers"])
    theta, yarn = _rope(cfg)
    q_lora = cfg.get("q_lora_rank")
    shared = int(cfg.get("n_shared_experts") or 0)
    rope_dim = int(cfg["qk_rope_head_dim"])
    return ModelArch(
        family="deepseek_v3", num_layers=layers, hidden_size=cfg["hidden_size"], num_heads=heads,
        num_kv_heads=heads, head_dim=int(cfg["qk_nope_head_dim"]) + rope_dim,
        ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096), rope_theta=theta,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=False, hf_architecture="DeepseekV3ForCausalLM",
        num_experts=experts, moe_top_k=k, moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        moe_norm_topk_prob=True, moe_layers=[int(i >= dense) for i in range(layers)],
        q_lora_rank=None if q_lora is None else int(q_lora), kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]), qk_rope_head_dim=rope_dim, v_head_dim=int(cfg["v_head_dim"]),
        moe_score_function="sigmoid", moe_expert_bias=True,
        moe_num_groups=groups if groups > 1 else 0, moe_group_topk=group_topk if groups > 1 else 0,
        moe_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        moe_shared_ffn_hidden_size=shared * int(cfg["moe_intermediate_size"]), yarn=yarn)


def deepseek_v3_hf_config(arch: ModelArch, dtype: str = "float32") -> dict:
    """The inverse, for writing HF checkpoints (MTP layers: none)."""
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.yarn:
        rope = {"rope_type": "yarn", "rope_theta": arch.rope_theta, **arch.yarn}
    dense = (arch.moe_layers or [1] * arch.num_layers).index(1) if any(arch.moe_layers or [1]) else arch.num_layers
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_hidden_layers": arch.num_layers, "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_heads,
        "intermediate_size": arch.ffn_hidden_size, "moe_intermediate_size": arch.moe_ffn_hidden_size,
        "vocab_size": arch.vocab_size, "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_eps, "tie_word_embeddings": arch.tie_word_embeddings, "hidden_act": "silu",
        "rope_parameters": rope, "rope_interleave": True, "attention_bias": False,
        "q_lora_rank": arch.q_lora_rank, "kv_lora_rank": arch.kv_lora_rank,
        "qk_nope_head_dim": arch.qk_nope_head_dim, "qk_rope_head_dim": arch.qk_rope_head_dim,
        "v_head_dim": arch.v_head_dim, "head_dim": arch.qk_rope_head_dim,
        "n_routed_experts": arch.num_experts, "num_experts_per_tok": arch.moe_top_k,
        "n_shared_experts": arch.moe_shared_ffn_hidden_size // arch.moe_ffn_hidden_size,
        "n_group": arch.moe_num_groups or 1, "topk_group": arch.moe_group_topk or 1,
        "routed_scaling_factor": arch.moe_scaling_factor, "norm_topk_prob": True,
        "first_k_dense_replace": dense, "num_nextn_predict_layers": 0, "torch_dtype": dtype,
    }


def mla_transformer_kwargs(arch: ModelArch) -> dict:
    """`MLATransformerConfig` fields (empty for non-MLA archs)."""
    if not arch.is_mla:
        return {}
    kw = dict(multi_latent_attention=True, q_lora_rank=arch.q_lora_rank, kv_lora_rank=arch.kv_lora_rank,
              qk_head_dim=arch.qk_nope_head_dim, qk_pos_emb_head_dim=arch.qk_rope_head_dim,
              v_head_dim=arch.v_head_dim, rotary_base=arch.rope_theta, qk_layernorm=True)
    if arch.yarn:
        y = arch.yarn
        kw.update(rope_type="yarn", rotary_scaling_factor=y["factor"],
                  original_max_position_embeddings=y["original_max_position_embeddings"],
                  beta_fast=y["beta_fast"], beta_slow=y["beta_slow"], mscale=y["mscale"],
                  mscale_all_dim=y["mscale_all_dim"])
    else:
        kw.update(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    return kw


def router_kwargs(arch: ModelArch, bias_update_rate: float) -> dict:
    """Sigmoid-routing `TransformerConfig` fields (empty for softmax-routed families)."""
    if arch.moe_score_function != "sigmoid":
        return {}
    return dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                moe_router_enable_expert_bias=arch.moe_expert_bias, moe_router_bias_update_rate=bias_update_rate,
                moe_router_topk_scaling_factor=arch.moe_scaling_factor,
                moe_router_num_groups=arch.moe_num_groups or None, moe_router_group_topk=arch.moe_group_topk or None,
                moe_shared_expert_intermediate_size=arch.moe_shared_ffn_hidden_size or None)
