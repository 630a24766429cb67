"""Core attention on PyTorch's fused kernels, and the "sdpa" layer spec.

Megatron-Core's local `DotProductAttention` materialises the `[b, heads, s, s]`
score tensor (baddbmm + fp32 softmax + bmm): at sequence 4096 that is most of a
step's time and memory. `SDPAttention` keeps the same constructor and forward
interface but calls `torch.nn.functional.scaled_dot_product_attention` (flash /
memory-efficient kernels on GPU), and accepts packed sequences (THD layout with
`PackedSeqParams.cu_seqlens_*`), which the local module refuses:

- packed on CUDA: `torch.nn.attention.varlen.varlen_attn` (flash varlen, torch >= 2.10);
- packed elsewhere (CPU, older torch): one causal SDPA call per sequence.

The "sdpa" spec is Megatron's local spec with this core attention and, on GPU,
Megatron's fused SwiGLU (`bias_swiglu_impl`, torch.compile'd and recomputing its
input in backward) and a torch.compile'd RMSNorm. Use it where Transformer Engine is absent; "te" stays the GPU
default when importable.
"""
from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_rl.models.layer_specs import register_layer_spec


def _varlen_fn():
    """`varlen_attn` with a causal flag, or None where this torch lacks it.

    torch 2.10 takes `is_causal=True`; 2.11+ takes `window_size=(-1, 0)`.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None, False

    def fn(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **causal)
    return fn, "enable_gqa" in params


_VARLEN, _VARLEN_GQA = _varlen_fn()


class SDPAttention(MegatronModule):
    """Drop-in for `DotProductAttention` (same arguments) backed by fused SDPA kernels.

    Inputs are `[s, b, heads, head_dim]` (or `[t, heads, head_dim]` when packed);
    the output is `[s, b, heads * head_dim]` (or `[t, heads * head_dim]`). The mask is
    Megatron's boolean convention, True = masked out; with no mask attention is causal.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type {config.softmax_type!r} is not supported (only 'vanilla')")
        if config.window_size is not None:
            raise ValueError("SDPAttention: sliding-window attention is not supported")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(
                required_pgs=["tp", "cp"] if config.context_parallel_size > 1 else ["tp"])
        tp = pg_collection.tp.size()
        # model.cp > 1: K/V all-gathered over CP, masked by global positions (_context_parallel)
        self.cp = config.context_parallel_size
        self.cp_group = pg_collection.cp if self.cp > 1 else None
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scale by layer_number and the fp32
        # softmax multiplies it back: the net scale is the plain one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        p = self.dropout_p if self.training else 0.0
        if self.cp > 1:
            return self._context_parallel(query, key, value, attention_mask, packed_seq_params, p)
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"SDPAttention: packed qkv_format {packed_seq_params.qkv_format!r}, expected 'thd'")
            return self._packed(query, key, value, packed_seq_params, p)
        # [s, b, n, d] -> [b, n, s, d]; SDPA takes the strided views as they are.
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is None:
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and q.size(2) > 1
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=self.groups != self.heads)
        else:
            # The memory-efficient kernel takes a mask but not grouped kv heads: expand them.
            k, v = self._expand_kv(k, v, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=p,
                                                 scale=self.softmax_scale)
        sq, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

    def _context_parallel(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                          params: Optional[PackedSeqParams], p: float) -> Tensor:
        """Local queries against K/V all-gathered over the CP group (parallel/context_parallel.py).
        Padded: the mask `[b, 1, s/cp, s]` (causal + padding by global position) comes from the
        forward. Packed: `_context_parallel_packed`."""
        from megatron_rl.parallel.context_parallel import all_gather_kv

        k, v = all_gather_kv(key), all_gather_kv(value)
        if params is not None:
            if p > 0:
                raise ValueError("SDPAttention: attention dropout is not supported with packed sequences")
            return self._context_parallel_packed(query, k, v, params)
        if attention_mask is None:
            raise ValueError("SDPAttention under model.cp > 1 needs the context-parallel attention mask of "
                             "parallel/context_parallel.py (run the model through models.forward.gpt_forward)")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, k, v))      # [s, b, n, d] -> [b, n, s, d]
        k, v = self._expand_kv(k, v, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=p,
                                             scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), self.heads * self.head_dim)

    def _context_parallel_packed(self, q: Tensor, k: Tensor, v: Tensor, params: PackedSeqParams) -> Tensor:
        """q `[t/cp, n, d]` (this rank's chunks r and 2cp-1-r of every segment), k/v `[t, g, d]`
        gathered rank-major. Each local chunk attends to its segment's keys up to the chunk's end,
        causally aligned at the lower right (`causal_lower_right`: flash / memory-efficient kernels
        on GPU, no `[t/cp, t]` mask, no work across segments)."""
        from torch.nn.attention.bias import causal_lower_right

        from megatron_rl.parallel.context_parallel import CPLayout

        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cp, rank = self.cp, self.cp_group.rank()
        order = CPLayout.packed(cu, cp, rank).gathered.to(k.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        k, v = self._expand_kv(k.index_select(0, inverse), v.index_select(0, inverse), dim=1)   # stream order
        bounds = cu.tolist()
        outs, off = [], 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            c = (end - start) // (2 * cp)
            for j, chunk in enumerate((rank, 2 * cp - 1 - rank)):
                k_end = start + (chunk + 1) * c
                qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in
                              (q[off + j * c: off + (j + 1) * c], k[start:k_end], v[start:k_end]))
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(c, k_end - start),
                                                   scale=self.softmax_scale)
                outs.append(o[0].transpose(0, 1))
            off += 2 * c
        return torch.cat(outs).reshape(q.size(0), self.heads * self.head_dim)

    def _expand_kv(self, k: Tensor, v: Tensor, dim: int):
        if self.groups == self.heads:
            return k, v
        rep = self.heads // self.groups
        return k.repeat_interleave(rep, dim=dim), v.repeat_interleave(rep, dim=dim)

    def _packed(self, q: Tensor, k: Tensor, v: Tensor, params: PackedSeqParams, p: float) -> Tensor:
        """q/k/v `[t, n, d]`; attention stays causal within each `cu_seqlens` segment."""
        if p > 0:
            raise ValueError("SDPAttention: attention dropout is not supported with packed sequences")
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        if not torch.equal(cu_q, cu_k):
            raise ValueError("SDPAttention: packed self-attention needs cu_seqlens_q == cu_seqlens_kv")
        t = q.size(0)
        global _VARLEN
        if q.is_cuda and _VARLEN is not None:
            cu = cu_q.to(device=q.device, dtype=torch.int32)
            max_len = int(params.max_seqlen_q or (cu[1:] - cu[:-1]).max())
            kx, vx = (k, v) if _VARLEN_GQA else self._expand_kv(k, v, dim=1)
            try:
                out = _VARLEN(q, kx, vx, cu, cu, max_len, max_len, self.softmax_scale)
                return out.reshape(t, self.heads * self.head_dim)
            except (RuntimeError, TypeError, NotImplementedError) as e:   # e.g. no flash kernel for this dtype/arch
                warnings.warn(f"SDPAttention: varlen_attn failed ({e}); using one SDPA call per sequence")
                _VARLEN = None
        k, v = self._expand_kv(k, v, dim=1)
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        outs = []
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))   # [1, n, len, d]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=qs.size(2) > 1, scale=self.softmax_scale)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs).reshape(t, self.heads * self.head_dim)


class FusedSwiGLUMLP(MLP):
    """Megatron's MLP with its fused SwiGLU path switched on for this module only.

    `bias_activation_fusion` is a global config flag our provider turns off for CPU
    runs; the fused kernel is torch.compile'd and saves only the fc1 output.
    """

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        if config.gated_linear_unit and config.activation_func is F.silu and not config.bias_activation_fusion:
            config = copy.copy(config)
            config.bias_activation_fusion = True
        super().__init__(config, *args, **kwargs)


_compiled_rms_norm = None


class CompiledRMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` (same parameters as the local spec's norm) whose function is
    torch.compile'd once for all layers (guards on shapes/dtypes, not on the module)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        global _compiled_rms_norm
        if _compiled_rms_norm is None:
            _compiled_rms_norm = torch.compile(F.rms_norm)
        return _compiled_rms_norm(x, self.normalized_shape, self.weight, self.eps)


def sdpa_layer_spec(qk_layernorm: bool = False, fused_swiglu: Optional[bool] = None,
                    compiled_norm: Optional[bool] = None):
    """Local spec with `SDPAttention`; `fused_swiglu` and `compiled_norm` default to "on GPU".

    On an H100 (docs/BENCHMARKS.md) fused SwiGLU added 6% and the compiled
    RMSNorm another 13% on a 1B model at sequence 4096; on CPU they stay off.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if fused_swiglu is None:
        fused_swiglu = torch.cuda.is_available()
    if fused_swiglu:
        spec.submodules.mlp.module = FusedSwiGLUMLP
    if compiled_norm is None:
        compiled_norm = torch.cuda.is_available()
    if compiled_norm:
        spec.submodules.input_layernorm = CompiledRMSNorm
        spec.submodules.pre_mlp_layernorm = CompiledRMSNorm
    return spec


@register_layer_spec("sdpa")
def _sdpa_spec(qk_layernorm: bool = False):
    return sdpa_layer_spec(qk_layernorm=qk_layernorm)
