"""Fused per-token log-prob and entropy of sampled tokens, vocab-parallel.

``token_logprob_entropy`` replaces ``log_softmax(logits.float()).gather(...)``
plus an entropy pass: one read of the logits in forward (online softmax), one
read + one write in backward, no float32 copy of ``[tokens, vocab]``. With a
TP group the vocabulary is split as Megatron's vocab-parallel layout does
(rank r holds ids ``[r * V_local, (r + 1) * V_local)``); only ``[tokens]``
statistics cross ranks (one MAX and one SUM all-reduce), and backward needs no
communication because the outputs, hence their gradients, are replicated.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megatron_rl.kernels.backends import get_backend


def combine_partials(m, s, t, x_label, tp_group):
    """Merge per-rank partials into ``(logprob, entropy, logZ)``.

    ``t`` is ``sum exp(x - m) (x - m)``; rescaling a rank's partials to the
    global max ``M``: ``s' = a s``, ``t' = a (t + (m - M) s)`` with ``a = exp(m - M)``.
    """
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=tp_group)
        alpha = torch.exp(m - m_global)
        stacked = torch.stack([alpha * s, alpha * (t + (m - m_global) * s), x_label])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)
        m, (s, t, x_label) = m_global, stacked.unbind(0)
    log_s = torch.log(s)
    logz = m + log_s
    entropy = log_s - t / s
    return x_label - logz, entropy, logz


def local_labels(labels: torch.Tensor, vocab_local: int, tp_group) -> torch.Tensor:
    """Flat int64 labels relative to this rank's first vocab id."""
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    return (labels.reshape(-1).to(torch.int64) - rank * vocab_local).contiguous()


def _is_user_storage(t: torch.Tensor) -> bool:
    """True when writing into ``t`` would overwrite a leaf (parameters, user data)."""
    base = t if t._base is None else t._base
    return base.is_leaf


class _TokenLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels_local, inv_temp, tp_group, inplace_backward, backend_name):
        backend = get_backend(backend_name, logits2d)
        m, s, t, x_label = backend.partials(logits2d, labels_local, inv_temp)
        logprob, entropy, logz = combine_partials(m, s, t, x_label, tp_group)
        ctx.save_for_backward(logits2d, labels_local, logz, entropy)
        ctx.inv_temp, ctx.inplace, ctx.backend = inv_temp, inplace_backward, backend
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits2d, labels_local, logz, entropy = ctx.saved_tensors
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(logz)
        if grad_entropy is None:
            grad_entropy = torch.zeros_like(logz)
        out = logits2d if ctx.inplace else torch.empty_like(logits2d)
        ctx.backend.backward(logits2d, labels_local, ctx.inv_temp, logz, entropy,
                             grad_logprob, grad_entropy, out)
        return out, None, None, None, None, None


def token_logprob_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None, temperature: float = 1.0,
                          inplace_backward: bool = False, backend: str | None = None):
    """Log-prob of ``labels`` and softmax entropy under ``logits / temperature``.

    logits: ``[..., vocab_local]`` in any float dtype; labels: the leading shape,
    global vocab ids. Returns ``(logprob, entropy)`` of the leading shape, float32
    (float64 for float64 logits). ``inplace_backward=True`` writes the gradient
    into the logits buffer (saves one logits-sized allocation); it is ignored with
    a warning when the logits are a leaf or a view of one, since that would
    overwrite user data or parameters. Autograd's version counter still raises if
    another op saved these logits for its own backward.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"token_logprob_entropy: labels shape {tuple(labels.shape)} must equal the leading "
                         f"shape of logits {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"token_logprob_entropy: temperature must be > 0, got {temperature}")
    vocab_local = logits.shape[-1]
    logits2d = logits.reshape(-1, vocab_local)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    labels_local = local_labels(labels, vocab_local, tp_group)
    if inplace_backward and logits.requires_grad and _is_user_storage(logits2d):
        warnings.warn("token_logprob_entropy: inplace_backward ignored for leaf logits (would overwrite them)")
        inplace_backward = False
    logprob, entropy = _TokenLogprobEntropy.apply(logits2d, labels_local, float(1.0 / temperature), tp_group,
                                                  inplace_backward, backend)
    lead = logits.shape[:-1]
    return logprob.reshape(lead), entropy.reshape(lead)
