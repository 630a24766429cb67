"""Fused token-weighted PPO loss (vocab-parallel) with a pure-torch reference.

- ``token_logprob_entropy``: per-token log-prob + entropy without a float32 copy of the logits.
- ``linear_token_logprob``: the same fused with the LM head, chunked over tokens (no full logits).
- ``token_weighted_ppo_loss``: PPO/GSPO + KL + entropy loss composed from ``megatron_rl.algos`` on top.
Triton kernels run for CUDA tensors when Triton is installed; otherwise the chunked torch path.
"""
from megatron_rl.kernels.backends import get_backend, register_backend, triton_available
from megatron_rl.kernels.linear import linear_token_logprob
from megatron_rl.kernels.logprob import token_logprob_entropy
from megatron_rl.kernels.ppo_loss import token_weighted_ppo_loss

__all__ = ["linear_token_logprob", "token_logprob_entropy", "token_weighted_ppo_loss",
           "get_backend", "register_backend", "triton_available"]
