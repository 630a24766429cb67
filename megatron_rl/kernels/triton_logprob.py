"""Triton backend: one program per block of rows, a loop over vocab chunks.

Forward is a single read of the logits (online max / sum-exp / entropy moment,
the label logit read directly); backward reads the logits once more and writes
the gradient once, optionally into the logits buffer itself. Same signatures
and conventions as ``reference.py`` (the oracle). Imported only when Triton is
present; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_M rows per program, max BLOCK_V vocab chunk, num_warps); tools/bench_fused_loss.py sweeps these.
CONFIG = {"fwd": (1, 4096, 4), "bwd": (1, 4096, 8)}  # fastest in the H100 sweep, docs/BENCHMARKS.md


@triton.jit
def _fwd_partials_kernel(logits_ptr, labels_ptr, out_ptr, rows, vocab, stride_row, inv_temp,
                         BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < vocab)[None, :]
        x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=1))
        d = x - m_new[:, None]
        e = tl.exp(d)
        alpha = tl.exp(m - m_new)
        t = alpha * (t + (m - m_new) * s) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    lab = tl.load(labels_ptr + row, mask=row_mask, other=-1)
    has_label = row_mask & (lab >= 0) & (lab < vocab)
    x_label = tl.load(row_ptr + lab, mask=has_label, other=0.0).to(tl.float32) * inv_temp
    tl.store(out_ptr + row, m, mask=row_mask)
    tl.store(out_ptr + rows + row, s, mask=row_mask)
    tl.store(out_ptr + 2 * rows + row, t, mask=row_mask)
    tl.store(out_ptr + 3 * rows + row, x_label, mask=row_mask)


@triton.jit
def _bwd_kernel(logits_ptr, grad_ptr, labels_ptr, logz_ptr, ent_ptr, glp_ptr, gh_ptr,
                rows, vocab, stride_row, stride_grad_row, inv_temp,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    logz = tl.load(logz_ptr + row, mask=row_mask, other=0.0)
    ent = tl.load(ent_ptr + row, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + row, mask=row_mask, other=0.0)
    g_h = tl.load(gh_ptr + row, mask=row_mask, other=0.0)
    lab = tl.load(labels_ptr + row, mask=row_mask, other=-1)
    coef = -g_lp - g_h * ent
    in_ptr = logits_ptr + row.to(tl.int64) * stride_row
    out_ptr = grad_ptr + row.to(tl.int64) * stride_grad_row
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < vocab)[None, :]
        x = tl.load(in_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        logp = x * inv_temp - logz[:, None]
        p = tl.exp(logp)
        g = tl.where(p > 0, p * (coef[:, None] - g_h[:, None] * logp), 0.0)
        g += tl.where(cols[None, :] == lab[:, None], g_lp[:, None], 0.0)
        tl.store(out_ptr[:, None] + cols[None, :], (g * inv_temp).to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_shape(kind: str, vocab: int):
    block_m, block_v, warps = CONFIG[kind]
    return block_m, min(block_v, triton.next_power_of_2(vocab)), warps


def partials(logits: torch.Tensor, labels_local: torch.Tensor, inv_temp: float):
    """Same contract as ``reference.partials`` (float32 statistics)."""
    rows, vocab = logits.shape
    out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out[0], out[1], out[2], out[3]
    block_m, block_v, warps = _launch_shape("fwd", vocab)
    _fwd_partials_kernel[(triton.cdiv(rows, block_m),)](
        logits, labels_local.contiguous(), out, rows, vocab, logits.stride(0), float(inv_temp),
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)
    return out[0], out[1], out[2], out[3]


def backward(logits, labels_local, inv_temp, logz, entropy, grad_logprob, grad_entropy, out):
    """Same contract as ``reference.backward``; ``out`` may alias ``logits``."""
    rows, vocab = logits.shape
    if rows == 0:
        return out
    block_m, block_v, warps = _launch_shape("bwd", vocab)
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731  [rows] vectors only
    _bwd_kernel[(triton.cdiv(rows, block_m),)](
        logits, out, labels_local.contiguous(), f32(logz), f32(entropy), f32(grad_logprob), f32(grad_entropy),
        rows, vocab, logits.stride(0), out.stride(0), float(inv_temp),
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)
    return out
