"""LM head + log-prob/entropy fused over token chunks: the full logits never exist.

``linear_token_logprob(hidden, weight, labels)`` equals
``token_logprob_entropy(hidden @ weight.T, labels)`` but computes the logits one
chunk of tokens at a time (forward), and recomputes each chunk in backward where
its gradient is written into the chunk in place and immediately contracted into
``d hidden`` and ``d weight``. Peak extra memory is one chunk of logits (plus the
``d weight`` that any backward returns), against the whole ``[tokens, vocab]`` logits and
its gradient otherwise; the price is one extra LM-head matmul (the recompute).
``d weight`` is accumulated in the weight's dtype (rounded once per chunk).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.kernels.backends import get_backend
from megatron_rl.kernels.logprob import combine_partials, local_labels

DEFAULT_CHUNK_ELEMS = 1 << 28  # logits per chunk: 512 MiB in bf16


def _chunks(rows: int, chunk_rows: int):
    for lo in range(0, rows, chunk_rows):
        yield lo, min(rows, lo + chunk_rows)


class _LinearTokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, labels_local, inv_temp, tp_group, chunk_rows, backend_name):
        backend = get_backend(backend_name, hidden2d)
        stats = torch.empty(4, hidden2d.shape[0], dtype=torch.float64 if hidden2d.dtype == torch.float64
                            else torch.float32, device=hidden2d.device)
        for lo, hi in _chunks(hidden2d.shape[0], chunk_rows):
            logits = hidden2d[lo:hi] @ weight.T
            for i, part in enumerate(backend.partials(logits, labels_local[lo:hi], inv_temp)):
                stats[i, lo:hi] = part
            del logits
        logprob, entropy, logz = combine_partials(*stats.unbind(0), tp_group)
        ctx.save_for_backward(hidden2d, weight, labels_local, logz, entropy)
        ctx.inv_temp, ctx.tp_group, ctx.chunk_rows, ctx.backend = inv_temp, tp_group, chunk_rows, backend
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden2d, weight, labels_local, logz, entropy = ctx.saved_tensors
        grad_logprob = torch.zeros_like(logz) if grad_logprob is None else grad_logprob
        grad_entropy = torch.zeros_like(logz) if grad_entropy is None else grad_entropy
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden2d) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for lo, hi in _chunks(hidden2d.shape[0], ctx.chunk_rows):
            logits = hidden2d[lo:hi] @ weight.T
            ctx.backend.backward(logits, labels_local[lo:hi], ctx.inv_temp, logz[lo:hi], entropy[lo:hi],
                                 grad_logprob[lo:hi], grad_entropy[lo:hi], logits)  # in place: now d logits
            if need_hidden:
                torch.matmul(logits, weight, out=grad_hidden[lo:hi])
            if need_weight:
                grad_weight.addmm_(logits.T, hidden2d[lo:hi])  # fp32 inside the GEMM, no weight-sized temp
            del logits
        if need_hidden and ctx.tp_group is not None and dist.get_world_size(ctx.tp_group) > 1:
            dist.all_reduce(grad_hidden, group=ctx.tp_group)  # hidden is replicated over the vocab split
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tp_group=None,
                         temperature: float = 1.0, chunk_tokens: int | None = None, backend: str | None = None):
    """Log-prob and entropy of ``labels`` under ``hidden @ weight.T / temperature``.

    hidden: ``[..., hidden_size]`` (replicated over ``tp_group``); weight:
    ``[vocab_local, hidden_size]`` (this rank's vocab rows, Megatron's output-layer
    layout); labels: the leading shape, global ids. Returns float32 ``(logprob,
    entropy)`` of the leading shape. With a TP group, backward all-reduces
    ``d hidden`` over it, so do not also route ``hidden`` through Megatron's
    ``copy_to_tensor_model_parallel_region``. ``chunk_tokens`` defaults to about
    ``2**28`` logits per chunk.
    """
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_token_logprob: weight must be [vocab_local, {hidden.shape[-1]}] to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_token_logprob: labels shape {tuple(labels.shape)} must equal the leading shape "
                         f"of hidden {tuple(hidden.shape)}")
    vocab_local = weight.shape[0]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens or max(1, DEFAULT_CHUNK_ELEMS // vocab_local)
    labels_local = local_labels(labels, vocab_local, tp_group)
    logprob, entropy = _LinearTokenLogprob.apply(hidden2d, weight, labels_local, float(1.0 / temperature),
                                                 tp_group, chunk, backend)
    return logprob.reshape(labels.shape), entropy.reshape(labels.shape)
