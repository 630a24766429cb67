"""Core attention and layer spec for multi-latent attention (DeepSeek-V3) without
Transformer Engine.

Megatron-Core 0.16.1's `MLASelfAttention` builds its core attention with
`k_channels` / `v_channels` (q.k over nope+rope dims, values of `v_head_dim`) and its own
softmax scale (YaRN mscale included); only TE's `TEDotProductAttention` takes those, the
local `DotProductAttention` raises. `MLACoreAttention` is `SDPAttention` (PyTorch SDPA,
padded and packed inputs) with those two arguments: keys and values have one head per
query head, and the output is `heads * v_channels` wide.
"""
from __future__ import annotations

from megatron_rl.models.sdpa_attention import SDPAttention


class MLACoreAttention(SDPAttention):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
        # Attention.__init__ builds one without k/v channels first; MLASelfAttention then replaces it.
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.groups = self.heads            # MLA: keys/values per head (num_query_groups is ignored)
        self.head_dim = v_channels or self.head_dim   # output width per head


def mla_local_spec():
    """Megatron's local MLA layer spec (q/kv latent RMSNorms on) with `MLACoreAttention`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True, multi_latent_attention=True)
    spec.submodules.self_attention.submodules.core_attention = MLACoreAttention
    return spec
