"""Mixture-of-experts terms of the memory planner (plan/memory.py calls these).

Megatron splits an MoE layer over a second grid: the router ([experts, hidden]) is
replicated on every rank, each rank holds `num_experts / ep` experts and each expert is
split over `etp` ranks like a dense MLP over TP. Expert gradients are reduced over the
expert-data-parallel group, `world / (etp * ep * pp)` ranks, so the distributed optimizer
shards expert state over that group (dense state over DP).

Activations assume balanced routing: one micro-batch of T tokens per DP replica sends
T * top_k token copies, spread over the DP * TP / etp expert slots of a pipeline stage,
so one GPU processes T * top_k * etp / TP copies with a hidden of h and an intermediate of
moe_ffn / etp each: per token (bytes, 16-bit activations)

    router:  8 E            fp32 logits and probabilities (/ TP under sequence parallel)
    copies:  4 h * k etp/TP  the permuted expert input (fc1's input) and fc2's output (the combine)
    experts: 6 f * k / TP    fc1's gated output (2 x 2f) and the activation's output (2f)
                             (+ 2f for an unfused SwiGLU)

Dispatcher buffers (alltoall): the send and receive copies of one layer's permuted tokens,
2 * T * k * etp / TP * h * bytes, alive while that layer runs. An imbalanced router moves
more tokens to some ranks than this average (Megatron's capacity factor is off: dropless).
"""
from __future__ import annotations


def expert_layer_params(s, ep: int, etp: int) -> int:
    """Expert parameters of one MoE layer on one GPU (SwiGLU experts: 3 h f each)."""
    if not s.is_moe:
        return 0
    return (s.num_experts // ep) * 3 * s.hidden_size * s.moe_ffn_hidden_size // etp


def router_params(s) -> int:
    return s.num_experts * s.hidden_size


def expert_data_parallel(gpus: int, ep: int, etp: int, pp: int) -> int:
    return gpus // (etp * ep * pp)


def moe_layer_activation_per_token(s, tp: int, etp: int, sp: bool, *, fused_swiglu: bool = True,
                                   act_bytes: int = 2) -> float:
    """Bytes per token an MoE layer's MLP part keeps for backward (replaces the dense MLP terms)."""
    u = act_bytes / 2
    router = 8 * s.num_experts / (tp if sp else 1)
    copies = u * 4 * s.hidden_size * s.moe_top_k * etp / tp
    experts = u * (6 + (0 if fused_swiglu else 2)) * s.moe_ffn_hidden_size * s.moe_top_k / tp
    return router + copies + experts


def dispatch_bytes(s, tokens: int, tp: int, etp: int, act_bytes: int = 2) -> float:
    """The alltoall dispatcher's send + receive buffers for one MoE layer of `tokens` tokens."""
    if not s.is_moe:
        return 0.0
    return 2 * tokens * s.moe_top_k * etp / tp * s.hidden_size * act_bytes
