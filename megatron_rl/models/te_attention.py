"""Transformer Engine core attention that honours a padding mask (issue #19's bf16 bug).

Megatron-Core 0.16.1's TE layer spec builds self-attention with `attn_mask_type=causal` and
passes our `[b, 1, s, s]` padding mask (`forward.causal_padding_mask`) to TE unchanged. TE's
`DotProductAttention` uses `attention_mask` only when the mask type includes "padding" or
"arbitrary" (TE 2.11 docstring): FlashAttention and cuDNN fused attention, which TE picks for
bf16/fp16, drop it and attend to left padding; the unfused backend, the only one for fp32,
ORs the mask with the causal one. So fp32 matched transformers and bf16 did not, with either
expert kind. With a mask given, this class switches the call to `arbitrary` (the mask already
holds the causal part); without one (no padding, packed THD) nothing changes.
"""
from __future__ import annotations


def mask_type_for_call(attention_mask, attn_mask_type):
    """The mask type TE must see: `arbitrary` when a mask tensor is given with a type TE
    would ignore it under (causal, or no_mask in decoding steps), else unchanged."""
    from megatron.core.transformer.enums import AttnMaskType

    if attention_mask is not None and attn_mask_type in (AttnMaskType.causal, AttnMaskType.no_mask):
        return AttnMaskType.arbitrary
    return attn_mask_type


def padding_aware_te_attention():
    """A `TEDotProductAttention` subclass (built lazily: importing it needs TE)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class PaddingAwareTEDotProductAttention(TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type, *args, **kwargs):
            return super().forward(query, key, value, attention_mask,
                                   mask_type_for_call(attention_mask, attn_mask_type), *args, **kwargs)

    return PaddingAwareTEDotProductAttention


def honour_padding_mask(layer_spec):
    """`layer_spec` (a TE `TransformerLayer` ModuleSpec) with its self-attention's core
    attention replaced by the padding-aware class; returns the same spec object."""
    core = layer_spec.submodules.self_attention.submodules
    core.core_attention = padding_aware_te_attention()
    return layer_spec
