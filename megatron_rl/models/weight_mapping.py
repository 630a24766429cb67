"""One declarative HF <-> Megatron-Core weight mapping, shared by checkpoint
conversion, HF loading and rollout weight sync.

Each `ParamRule` names a Megatron parameter (local-spec names, `{L}` = global layer
index), the HF tensors it is made of, how they are fused (`copy`, `qkv`,
`gate_up`) and how the fused tensor is split over tensor-parallel ranks
(`tp_dim` 0 = column/vocab parallel, 1 = row parallel, None = replicated).
Mixture-of-experts rules carry `{E}` (the global expert index) and `expert=True`:
they are split over the expert-tensor-parallel group and spread over expert-parallel
ranks. Their HF names depend on the family (`MOE_RULES`), so `find_rule` takes the arch.
Transformer Engine specs fuse the norms into the following linear layer; `TE_RENAMES`
translates those names. TE's grouped-GEMM experts (`TEGroupedMLP`) hold local expert i as
`mlp.experts.linear_fc1.weight{i}` / `linear_fc2.weight{i}` (same per-expert shapes and
ETP shards as SequentialMLP's); `canonical_name` renames them to `local_experts.{i}.*`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from megatron_rl.models.hf_config import ModelArch


@dataclass(frozen=True)
class ParamRule:
    mcore: str
    hf: tuple[str, ...]
    fuse: str = "copy"          # copy | qkv | gate_up
    tp_dim: int | None = None
    vocab: bool = False         # vocab-parallel: padded to a multiple of tp
    expert: bool = False        # an expert weight: etp-sharded, one EP rank holds it


_L = "model.layers.{L}."
RULES: tuple[ParamRule, ...] = (
    ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0, vocab=True),
    ParamRule("decoder.layers.{L}.input_layernorm.weight", (_L + "input_layernorm.weight",)),
    ParamRule("decoder.layers.{L}.self_attention.linear_qkv.weight",
              (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
              fuse="qkv", tp_dim=0),
    ParamRule("decoder.layers.{L}.self_attention.linear_qkv.bias",
              (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
              fuse="qkv", tp_dim=0),
    ParamRule("decoder.layers.{L}.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), tp_dim=1),
    ParamRule("decoder.layers.{L}.pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
    ParamRule("decoder.layers.{L}.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
              fuse="gate_up", tp_dim=0),
    ParamRule("decoder.layers.{L}.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), tp_dim=1),
    ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ParamRule("output_layer.weight", ("lm_head.weight",), tp_dim=0, vocab=True),
)

QK_NORM_RULES: tuple[ParamRule, ...] = (
    ParamRule("decoder.layers.{L}.self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",)),
    ParamRule("decoder.layers.{L}.self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",)),
)
# DeepSeek-V3 multi-latent attention (models/deepseek_v3.py); the column-parallel down projections
# are split over TP on their output dim like the up projections (MLASelfAttention gathers them).
_SA = "decoder.layers.{L}.self_attention."
MLA_RULES: tuple[ParamRule, ...] = (
    ParamRule(_SA + "linear_q_proj.weight", (_L + "self_attn.q_proj.weight",), tp_dim=0),
    ParamRule(_SA + "linear_q_down_proj.weight", (_L + "self_attn.q_a_proj.weight",), tp_dim=0),
    ParamRule(_SA + "q_layernorm.weight", (_L + "self_attn.q_a_layernorm.weight",)),
    ParamRule(_SA + "linear_q_up_proj.weight", (_L + "self_attn.q_b_proj.weight",), tp_dim=0),
    ParamRule(_SA + "linear_kv_down_proj.weight", (_L + "self_attn.kv_a_proj_with_mqa.weight",), tp_dim=0),
    ParamRule(_SA + "kv_layernorm.weight", (_L + "self_attn.kv_a_layernorm.weight",)),
    ParamRule(_SA + "linear_kv_up_proj.weight", (_L + "self_attn.kv_b_proj.weight",), tp_dim=0),
)
_DENSE_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
_ROUTER = "decoder.layers.{L}.mlp.router.weight"
_FC1 = "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight"
_FC2 = "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight"
_EXPERT_BIAS = "decoder.layers.{L}.mlp.router.expert_bias"
_SHARED_FC1 = "decoder.layers.{L}.mlp.shared_experts.linear_fc1.weight"
_SHARED_FC2 = "decoder.layers.{L}.mlp.shared_experts.linear_fc2.weight"


def _moe_rules(router: str, gate: str, up: str, down: str) -> tuple[ParamRule, ...]:
    return (ParamRule(_ROUTER, (_L + router,)),
            ParamRule(_FC1, (_L + gate, _L + up), fuse="gate_up", tp_dim=0, expert=True),
            ParamRule(_FC2, (_L + down,), tp_dim=1, expert=True))


MOE_RULES: dict[str, tuple[ParamRule, ...]] = {
    "qwen3_moe": _moe_rules("mlp.gate.weight", "mlp.experts.{E}.gate_proj.weight",
                            "mlp.experts.{E}.up_proj.weight", "mlp.experts.{E}.down_proj.weight"),
    "mixtral": _moe_rules("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{E}.w1.weight",
                          "block_sparse_moe.experts.{E}.w3.weight", "block_sparse_moe.experts.{E}.w2.weight"),
    # the aux-free bias is the router's `expert_bias` buffer; shared experts are split over TP (not expert-TP)
    "deepseek_v3": _moe_rules("mlp.gate.weight", "mlp.experts.{E}.gate_proj.weight",
                              "mlp.experts.{E}.up_proj.weight", "mlp.experts.{E}.down_proj.weight") + (
        ParamRule(_EXPERT_BIAS, (_L + "mlp.gate.e_score_correction_bias",)),
        ParamRule(_SHARED_FC1, (_L + "mlp.shared_experts.gate_proj.weight", _L + "mlp.shared_experts.up_proj.weight"),
                  fuse="gate_up", tp_dim=0),
        ParamRule(_SHARED_FC2, (_L + "mlp.shared_experts.down_proj.weight",), tp_dim=1)),
}

TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}



def _rx(rule: ParamRule) -> re.Pattern:
    pat = re.escape(rule.mcore).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile("^" + pat + "$")


_RULE_RES = [(_rx(r), r) for r in RULES + QK_NORM_RULES]
_MOE_RES = {fam: [(_rx(r), r) for r in rules] for fam, rules in MOE_RULES.items()}
_MLA_RES = [(_rx(r), r) for r in MLA_RULES]


_GROUPED_EXPERT_RX = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")


def canonical_name(name: str) -> str:
    """Megatron parameter name under any spec -> local-spec name (SequentialMLP experts)."""
    m = _GROUPED_EXPERT_RX.match(name)
    if m:
        return f"{m.group(1)}local_experts.{m.group(4)}.{m.group(2)}.{m.group(3)}"
    for local, te in TE_RENAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def find_rule(mcore_name: str, arch: ModelArch | None = None) -> tuple[ParamRule, int | None]:
    """The rule for a (canonical, global-layer, global-expert) Megatron name and its layer.

    An expert rule comes back bound to its expert index (`{E}` filled in), so
    `hf_names(rule, layer)` is complete; expert names need `arch` (the HF names
    depend on the family).
    """
    for rx, rule in (_MLA_RES if arch is not None and arch.is_mla else []) + _RULE_RES:
        m = rx.match(mcore_name)
        if m:
            return rule, (int(m.group("L")) if "L" in m.groupdict() else None)
    if mcore_name.startswith("visual."):        # vision tower (models/vl): HF names, replicated over TP
        return ParamRule(mcore_name, (mcore_name,)), None
    if ".mlp.router." in mcore_name or ".mlp.experts." in mcore_name or ".mlp.shared_experts." in mcore_name:
        if arch is None or arch.family not in _MOE_RES:
            raise KeyError(f"Megatron parameter {mcore_name!r} is a mixture-of-experts weight: its HF name "
                           f"needs a MoE arch (families {sorted(MOE_RULES)}), got "
                           f"{None if arch is None else arch.family!r}")
        for rx, rule in _MOE_RES[arch.family]:
            m = rx.match(mcore_name)
            if m:
                e = m.groupdict().get("E")
                if e is not None:
                    rule = replace(rule, mcore=rule.mcore.replace("{E}", e),
                                   hf=tuple(h.replace("{E}", e) for h in rule.hf))
                return rule, int(m.group("L"))
    raise KeyError(f"unknown Megatron parameter name {mcore_name!r}: no HF mapping rule matches")


def rules_for(arch: ModelArch) -> list[ParamRule]:
    out = []
    for r in RULES:
        if r.mcore.endswith("linear_qkv.bias") and not arch.qkv_bias:
            continue
        if r.mcore == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        if arch.is_mla and ".linear_qkv." in r.mcore:
            continue
        out.append(r)
    if arch.is_mla:
        proj = next(i for i, r in enumerate(out) if r.mcore.endswith("linear_proj.weight"))
        out[proj:proj] = [r for r in MLA_RULES if ("linear_q_proj" in r.mcore) == (arch.q_lora_rank is None)
                          or "kv_" in r.mcore]
    if arch.qk_layernorm:
        proj = next(i for i, r in enumerate(out) if r.mcore.endswith("linear_proj.weight"))
        out[proj:proj] = QK_NORM_RULES      # HF order: q/k norms sit in self_attn
    return out


def is_moe_layer(arch: ModelArch, layer: int) -> bool:
    return arch.is_moe and bool((arch.moe_layers or [1] * arch.num_layers)[layer])


def layer_param_names(arch: ModelArch, layer: int) -> list[str]:
    """Megatron names of one decoder layer (all experts, global indices)."""
    names = []
    for r in rules_for(arch):
        if "{L}" not in r.mcore:
            continue
        if is_moe_layer(arch, layer) and r.mcore.endswith(_DENSE_MLP):
            if r.mcore.endswith("linear_fc1.weight"):
                continue
            names.append(_ROUTER.format(L=layer))
            if arch.moe_expert_bias:
                names.append(_EXPERT_BIAS.format(L=layer))
            for e in range(arch.num_experts):
                names += [_FC1.format(L=layer, E=e), _FC2.format(L=layer, E=e)]
            if arch.moe_shared_ffn_hidden_size:
                names += [_SHARED_FC1.format(L=layer), _SHARED_FC2.format(L=layer)]
            continue
        names.append(r.mcore.format(L=layer))
    return names


def global_param_names(arch: ModelArch) -> list[str]:
    """Every Megatron parameter of the full model, in HF order (layers ascending)."""
    names = []
    for r in rules_for(arch):
        if "{L}" in r.mcore:
            continue
        if r.mcore.startswith("embedding"):
            names.append(r.mcore)
    if arch.is_vl:
        from megatron_rl.models.vl.vision import vision_param_shapes
        names += list(vision_param_shapes(arch))
    for layer in range(arch.num_layers):
        names += layer_param_names(arch, layer)
    names += [r.mcore for r in rules_for(arch) if "{L}" not in r.mcore and not r.mcore.startswith("embedding")]
    return names


def global_shape(gname: str, arch: ModelArch) -> tuple[int, ...]:
    """The full (TP=1) shape of a canonical global Megatron parameter."""
    h, hd = arch.hidden_size, arch.head_dim
    if gname.startswith("visual.") and arch.is_vl:
        from megatron_rl.models.vl.vision import vision_param_shapes
        return vision_param_shapes(arch)[gname]
    tail = gname.split(".", 3)[-1] if gname.startswith("decoder.layers.") else gname
    tail = re.sub(r"^mlp\.experts\.local_experts\.\d+\.", "expert.", tail)
    shapes = {
        "embedding.word_embeddings.weight": (arch.vocab_size, h),
        "output_layer.weight": (arch.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": ((arch.num_heads + 2 * arch.num_kv_heads) * hd, h),
        "self_attention.linear_qkv.bias": ((arch.num_heads + 2 * arch.num_kv_heads) * hd,),
        "self_attention.q_layernorm.weight": (hd,),
        "self_attention.k_layernorm.weight": (hd,),
        "self_attention.linear_proj.weight": (h, arch.num_heads * hd),
        "mlp.linear_fc1.weight": (2 * arch.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, arch.ffn_hidden_size),
        "mlp.router.weight": (arch.num_experts, h),
        "expert.linear_fc1.weight": (2 * arch.moe_ffn_hidden_size, h),
        "expert.linear_fc2.weight": (h, arch.moe_ffn_hidden_size),
        "mlp.router.expert_bias": (arch.num_experts,),
        "mlp.shared_experts.linear_fc1.weight": (2 * arch.moe_shared_ffn_hidden_size, h),
        "mlp.shared_experts.linear_fc2.weight": (h, arch.moe_shared_ffn_hidden_size),
    }
    if arch.is_mla:
        n, q = arch.num_heads, arch.q_lora_rank
        shapes.update({
            "self_attention.linear_q_proj.weight": (n * hd, h),
            "self_attention.linear_q_down_proj.weight": (q, h),
            "self_attention.q_layernorm.weight": (q,),
            "self_attention.linear_q_up_proj.weight": (n * hd, q),
            "self_attention.linear_kv_down_proj.weight": (arch.kv_lora_rank + arch.qk_rope_head_dim, h),
            "self_attention.kv_layernorm.weight": (arch.kv_lora_rank,),
            "self_attention.linear_kv_up_proj.weight": (n * (arch.qk_nope_head_dim + arch.v_head_dim), arch.kv_lora_rank),
            "self_attention.linear_proj.weight": (h, n * arch.v_head_dim),
        })
    if tail not in shapes:
        raise KeyError(f"no global shape known for Megatron parameter {gname!r}")
    return shapes[tail]


def hf_names(rule: ParamRule, layer: int | None) -> list[str]:
    return [h.format(L=layer) for h in rule.hf]


# --- fusing HF tensors into the Megatron global (TP=1) layout and back -------------

def fuse_hf(rule: ParamRule, tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    if rule.fuse == "copy":
        return tensors[0]
    if rule.fuse == "gate_up":
        return torch.cat(tensors, 0)
    q, k, v = tensors
    g, hd = arch.num_kv_heads, arch.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, (arch.num_heads // g) * hd, *rest)
    k = k.reshape(g, hd, *rest)
    v = v.reshape(g, hd, *rest)
    return torch.cat([q, k, v], 1).reshape(-1, *rest)


def split_to_hf(rule: ParamRule, fused: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    if rule.fuse == "copy":
        return [fused]
    if rule.fuse == "gate_up":
        return list(fused.chunk(2, 0))
    g, hd = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // g
    rest = fused.shape[1:]
    x = fused.reshape(g, (per + 2) * hd, *rest)
    q, k, v = x.split([per * hd, hd, hd], 1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


# --- tensor-parallel sharding of the global layout ---------------------------------

def tp_shard(rule: ParamRule, full: torch.Tensor, rank: int, tp: int, arch: ModelArch) -> torch.Tensor:
    if rule.tp_dim is None or tp == 1 and not rule.vocab:
        return full
    if rule.vocab:
        padded = ((arch.vocab_size + tp - 1) // tp) * tp
        if full.shape[0] < padded:
            full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])], 0)
    if rule.fuse == "gate_up":
        gate, up = full.chunk(2, 0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], 0)
    return full.chunk(tp, rule.tp_dim)[rank]


def tp_unshard(rule: ParamRule, shards: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    if rule.tp_dim is None:
        return shards[0]
    if rule.fuse == "gate_up":
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)], 0)
    full = torch.cat(shards, rule.tp_dim)
    if rule.vocab:
        full = full[: arch.vocab_size]
    return full


def local_to_global_name(name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """`decoder.layers.3.x` on a pipeline stage starting at layer 8 -> `decoder.layers.11.x`;
    `...local_experts.1.y` on an expert-parallel rank whose first expert is 4 -> `...local_experts.5.y`."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return name
    rest = m.group(2)
    if expert_offset:
        rest = re.sub(r"^mlp\.experts\.local_experts\.(\d+)\.",
                      lambda e: f"mlp.experts.local_experts.{int(e.group(1)) + expert_offset}.", rest)
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{rest}"


def global_to_local_name(name: str, layer_offset: int) -> str:
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) - layer_offset}.{m.group(2)}"
