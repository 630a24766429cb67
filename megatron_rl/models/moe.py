"""Mixture-of-experts models on Megatron-Core's MoE layer (Qwen3-MoE, Mixtral).

Two pieces the provider asks for:
- `moe_transformer_kwargs(arch, moe)`: the `TransformerConfig` MoE fields that
  reproduce HF routing (softmax over fp32 router logits, top-k, renormalised or not)
  plus the training-only options of `model.moe`. Routing is dropless (no capacity
  factor). Experts are `TEGroupedMLP` (one grouped GEMM per layer) under layer_spec te
  with `model.moe.grouped_gemm` auto/true, else `SequentialMLP` (`resolve_grouped_gemm`;
  `layer_spec: auto` picks te for MoE models on a GPU where TE imports, models/layer_specs.py);
  both map to the same HF per-expert names (`weight_mapping.canonical_name`).
- `moe_block_spec(dense_spec, ...)`: per-layer specs for this pipeline stage, the
  MoE layer where `arch.moe_layers` says so (Megatron's `moe_layer_freq` list) and the
  dense spec elsewhere.

HF routing vs Megatron: HF takes softmax over all experts, then top-k, then (with
`norm_topk_prob`, always in Mixtral) divides by the top-k sum. Softmax is monotone and
renormalising equals a softmax over the top-k logits, which is Megatron's default
(`moe_router_pre_softmax=False`); without renormalisation it is Megatron's
pre-softmax mode.
"""
from __future__ import annotations

import copy
import re

from megatron_rl.models.hf_config import ModelArch
from megatron_rl.models.moe_config import MoEConfig


def resolve_grouped_gemm(setting: bool | str, spec_name: str) -> bool:
    """`model.moe.grouped_gemm` for a resolved layer spec: auto means TEGroupedMLP on the TE spec
    (bf16 logits 5.9e-3 from transformers' on the H200, as te's SequentialMLP, once the padding
    mask reached TE's attention: models/te_attention.py; PPO update 3.23x sdpa's SequentialMLP on
    the A3B slice; docs/BENCHMARKS.md) and SequentialMLP elsewhere; false keeps SequentialMLP.
    Off TE only megatron-core's legacy `GroupedMLP` (grouped_gemm package) would group the
    experts; its fused weight1/weight2 layout has no HF mapping here, so true with a non-TE spec
    is refused."""
    if setting == "auto":
        return spec_name == "te"
    if setting and spec_name != "te":
        from megatron.core.transformer.moe import grouped_gemm_util
        pkg = ("the grouped_gemm package is importable, but megatron-core's legacy GroupedMLP stores all "
               "experts in fused weight1/weight2 tensors, which the HF weight mapping does not cover"
               if grouped_gemm_util.grouped_gemm_is_available() else
               "megatron-core's legacy GroupedMLP also needs the grouped_gemm package, which is not importable")
        raise ValueError(f"model.moe.grouped_gemm=true needs model.layer_spec=te (TEGroupedMLP), got layer spec "
                         f"{spec_name!r}: {pkg}; set model.moe.grouped_gemm=auto or false")
    return bool(setting)


def moe_transformer_kwargs(arch: ModelArch, moe: MoEConfig | None = None, layer_spec: str = "local") -> dict:
    """MoE fields for `TransformerConfig` ({} for dense archs); `layer_spec` (any name,
    auto included) decides `moe_grouped_gemm` with `moe.grouped_gemm`."""
    from megatron.core import parallel_state as mpu

    from megatron_rl.models.layer_specs import resolve_layer_spec_name

    moe = moe or MoEConfig()
    ep = mpu.get_expert_model_parallel_world_size()
    etp = mpu.get_expert_tensor_parallel_world_size()
    if not arch.is_moe:
        return {}
    if arch.moe_top_k == 1 and arch.moe_norm_topk_prob:
        raise ValueError("num_experts_per_tok=1 with renormalised top-k probabilities (norm_topk_prob / Mixtral) "
                         "is not supported: every token's weight is 1 and the router gets no gradient")
    if arch.num_experts % ep:
        raise ValueError(f"num_experts={arch.num_experts} is not divisible by model.ep={ep}")
    layers = list(arch.moe_layers or [1] * arch.num_layers)
    if len(layers) != arch.num_layers:
        raise ValueError(f"arch.moe_layers has {len(layers)} entries for {arch.num_layers} layers")
    from megatron_rl.models.deepseek_v3 import router_kwargs
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_top_k,
        moe_layer_freq=layers,
        **({} if arch.moe_score_function == "sigmoid" else dict(
            moe_router_pre_softmax=not arch.moe_norm_topk_prob, moe_router_score_function="softmax")),
        moe_router_dtype=None if moe.router_dtype == "model" else moe.router_dtype,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=float(moe.aux_loss_coef),
        moe_z_loss_coeff=float(moe.z_loss_coef) if moe.z_loss_coef > 0 else None,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=resolve_grouped_gemm(moe.grouped_gemm, resolve_layer_spec_name(   # auto: te if TE imports
            layer_spec, moe=moe.grouped_gemm is not False and not arch.is_mla, grouped_gemm=moe.grouped_gemm is True)),
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_enable_routing_replay=bool(moe.routing_replay),   # models/routing_replay.py drives it
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        **router_kwargs(arch, moe.expert_bias_update_rate),   # DeepSeek-V3: sigmoid + expert bias
    )


def moe_layer_spec(dense_spec, spec_name: str, qk_layernorm: bool, num_experts: int, grouped_gemm: bool = False):
    """The dense layer spec with its MLP replaced by Megatron's `MoELayer` (TEGroupedMLP
    experts with `grouped_gemm` under the TE spec, else SequentialMLP)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    if grouped_gemm and spec_name != "te":
        raise ValueError(f"grouped-GEMM experts need layer spec 'te', got {spec_name!r} (model.moe.grouped_gemm)")
    if spec_name == "te":
        # TE fuses pre_mlp_layernorm into linear_fc1 in dense layers only; Megatron's TE
        # spec builds the MoE variant with a separate norm.
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        from megatron_rl.models.te_attention import honour_padding_mask
        return honour_padding_mask(get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=grouped_gemm, qk_layernorm=qk_layernorm))
    spec = copy.deepcopy(dense_spec)
    spec.submodules.mlp = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts,
                                                          moe_grouped_gemm=False)
    # The local spec files pre_mlp_layernorm under TE's fused `mlp.linear_fc1.layer_norm_*`; TE's MoE
    # layers keep a separate `pre_mlp_layernorm` (nothing to fuse into), so MoE layers keep that
    # key too and dist-checkpoints move between the te and local/sdpa specs.
    keys = dict(spec.submodules.sharded_state_dict_keys_map or {})
    keys.pop("pre_mlp_layernorm.", None)
    spec.submodules.sharded_state_dict_keys_map = keys
    return spec


def moe_block_spec(dense_spec, spec_name: str, config, qk_layernorm: bool, vp_stage: int | None = None):
    """`TransformerBlockSubmodules` for this (virtual) pipeline stage's layers."""
    from megatron.core.transformer.transformer_block import (LayerNormImpl, TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    sparse = moe_layer_spec(dense_spec, spec_name, qk_layernorm, config.num_moe_experts,
                            grouped_gemm=bool(config.moe_grouped_gemm))
    pattern = config.moe_layer_freq
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    specs = [sparse if pattern[i] else dense_spec for i in range(offset, offset + n)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LayerNormImpl)


# --- expert weights under expert parallelism ---------------------------------------
# Each EP rank holds experts [ep_rank * n_local, (ep_rank + 1) * n_local) as
# `local_experts.0..n_local-1` (TEGroupedMLP: `linear_fc1.weight0..n_local-1`, renamed to
# these by `weight_mapping.canonical_name`), each split over the expert-tensor-parallel group like a
# dense MLP over TP. Names outside this module use global expert indices.

_EXPERT_RX = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def local_expert_count(arch: ModelArch) -> int:
    from megatron.core import parallel_state as mpu
    return arch.num_experts // mpu.get_expert_model_parallel_world_size()


def expert_offset(arch: ModelArch | None) -> int:
    """Global index of this rank's first local expert (0 without EP or for dense archs)."""
    from megatron.core import parallel_state as mpu

    if arch is None or not arch.is_moe:
        return 0
    return mpu.get_expert_model_parallel_rank() * local_expert_count(arch)


def expert_tp_layout() -> tuple[int, int]:
    """(expert-tensor-parallel size, rank): how expert weights are split."""
    from megatron.core import parallel_state as mpu
    return mpu.get_expert_tensor_parallel_world_size(), mpu.get_expert_tensor_parallel_rank()


def resident_name(gname: str, arch: ModelArch) -> str:
    """A name this rank holds with the same stage, shape and dtype as `gname`: the
    expert itself when local, else the local expert in the same slot of the same layer."""
    m = _EXPERT_RX.match(gname)
    if not m or not arch.is_moe:
        return gname
    n_local = local_expert_count(arch)
    return f"{m.group(1)}{expert_offset(arch) + int(m.group(2)) % n_local}{m.group(3)}"


def gather_expert(rule, gname: str, local: dict, arch: ModelArch):
    """The full (etp=1) tensor of global expert weight `gname` on every rank of this
    pipeline stage: all-gathered over expert-TP on its EP rank, then broadcast over EP."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_rl.models.weight_mapping import global_shape, tp_unshard

    e = int(_EXPERT_RX.match(gname).group(2))
    owner = e // local_expert_count(arch)
    mine = local[resident_name(gname, arch)].detach()
    etp, _ = expert_tp_layout()
    ep = mpu.get_expert_model_parallel_world_size()
    full = None
    if mpu.get_expert_model_parallel_rank() == owner:
        if etp > 1:
            parts = [torch.empty_like(mine) for _ in range(etp)]
            dist.all_gather(parts, mine.contiguous(), group=mpu.get_expert_tensor_parallel_group())
            full = tp_unshard(rule, parts, arch)
        else:
            full = mine
    if ep == 1:
        return full
    if full is None:
        full = torch.empty(global_shape(gname, arch), dtype=mine.dtype, device=mine.device)
    group = mpu.get_expert_model_parallel_group()
    full = full.contiguous()
    dist.broadcast(full, src=dist.get_process_group_ranks(group)[owner], group=group)
    return full
