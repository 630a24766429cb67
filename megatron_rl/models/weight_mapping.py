"""One declarative HF <-> Megatron-Core weight mapping, shared by checkpoint
conversion, HF loading and rollout weight sync.

Each `ParamRule` names a Megatron parameter (local-spec names, `{L}` = global layer
index), the HF tensors it is made of, how they are fused (`copy`, `qkv`,
`gate_up`) and how the fused tensor is split over tensor-parallel ranks
(`tp_dim` 0 = column/vocab parallel, 1 = row parallel, None = replicated).
Transformer Engine specs fuse the norms into the following linear layer; `TE_RENAMES`
translates those names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_rl.models.hf_config import ModelArch


@dataclass(frozen=True)
class ParamRule:
    mcore: str
    hf: tuple[str, ...]
    fuse: str = "copy"          # copy | qkv | gate_up
    tp_dim: int | None = None
    vocab: bool = False         # vocab-parallel: padded to a multiple of tp


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

TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

_RULE_RES = [(re.compile("^" + re.escape(r.mcore).replace(r"\{L\}", r"(\d+)") + "$"), r) for r in RULES]


def canonical_name(name: str) -> str:
    """Megatron parameter name under any spec -> local-spec name."""
    for local, te in TE_RENAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def find_rule(mcore_name: str) -> tuple[ParamRule, int | None]:
    """The rule for a (canonical, global-layer) Megatron name and its layer index."""
    for rx, rule in _RULE_RES:
        m = rx.match(mcore_name)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    raise KeyError(f"unknown Megatron parameter name {mcore_name!r}: no HF mapping rule matches")


def rules_for(arch: ModelArch) -> list[ParamRule]:
    out = []
    for r in RULES:
        if r.mcore.endswith("linear_qkv.bias") and not arch.qkv_bias:
            continue
        if r.mcore == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        out.append(r)
    return out


def global_param_names(arch: ModelArch) -> list[str]:
    """Every Megatron parameter of the full model, in HF order (layers ascending)."""
    names = []
    for r in rules_for(arch):
        if "{L}" in r.mcore:
            continue
        if r.mcore.startswith("embedding"):
            names.append(r.mcore)
    for layer in range(arch.num_layers):
        names += [r.mcore.format(L=layer) for r in rules_for(arch) if "{L}" in r.mcore]
    names += [r.mcore for r in rules_for(arch) if "{L}" not in r.mcore and not r.mcore.startswith("embedding")]
    return names


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


def local_to_global_name(name: str, layer_offset: int) -> str:
    """`decoder.layers.3.x` on a pipeline stage starting at layer 8 -> `decoder.layers.11.x`."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"


def global_to_local_name(name: str, layer_offset: int) -> str:
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) - layer_offset}.{m.group(2)}"
