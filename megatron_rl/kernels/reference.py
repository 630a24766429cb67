"""Pure-torch backend: the oracle for the Triton kernels and the CPU path.

Works on blocks of rows so that at most ``ROW_BLOCK_ELEMS`` logits are held in
the compute dtype at once (float32, or float64 for float64 logits); the full
``[tokens, vocab]`` float32 copy that ``log_softmax(logits.float())`` makes is
never built.

Both functions take 2-D logits ``[rows, vocab_local]`` and ``labels_local``
(label minus the first vocab id of this rank; ids outside ``[0, vocab_local)``
belong to another rank and contribute nothing here).
"""
from __future__ import annotations

import torch

ROW_BLOCK_ELEMS = 1 << 22  # 16 MiB of float32 per block


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float32, except float64 logits stay float64 (used by tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(rows: int, vocab: int):
    step = max(1, ROW_BLOCK_ELEMS // max(vocab, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _label_index(labels_local: torch.Tensor, vocab: int):
    valid = (labels_local >= 0) & (labels_local < vocab)
    return valid, torch.where(valid, labels_local, torch.zeros_like(labels_local))


@torch.no_grad()
def partials(logits: torch.Tensor, labels_local: torch.Tensor, inv_temp: float):
    """Per-row softmax partials of ``x = logits * inv_temp`` over the local vocab.

    Returns ``(m, s, t, x_label)``: row max, ``sum exp(x - m)``,
    ``sum exp(x - m) * (x - m)`` (the entropy moment, kept relative to ``m`` so
    entropy does not cancel large numbers), and the label's ``x`` (0 where the
    label is on another rank).
    """
    rows, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    out = torch.empty(4, rows, dtype=cdt, device=logits.device)
    valid, idx = _label_index(labels_local, vocab)
    for lo, hi in _row_blocks(rows, vocab):
        x = logits[lo:hi].to(cdt) * inv_temp
        m = x.amax(dim=-1, keepdim=True)
        x -= m  # x now holds x - m
        e = x.exp()
        out[0, lo:hi] = m.squeeze(-1)
        out[1, lo:hi] = e.sum(-1)
        out[2, lo:hi] = (e * x).nansum(-1)  # 0 * -inf from -inf logits counts as 0
        x_label = x.gather(-1, idx[lo:hi, None]).squeeze(-1) + m.squeeze(-1)
        out[3, lo:hi] = torch.where(valid[lo:hi], x_label, torch.zeros_like(x_label))
    return out[0], out[1], out[2], out[3]


@torch.no_grad()
def backward(logits, labels_local, inv_temp, logz, entropy, grad_logprob, grad_entropy, out):
    """Write ``d loss / d logits`` into ``out`` (which may be ``logits`` itself).

    With ``x = z * inv_temp``, ``log p = x - logZ``:
    ``d/dz = inv_temp * (g_lp * (onehot - p) - g_H * p * (log p + H))``.
    """
    rows, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    valid, idx = _label_index(labels_local, vocab)
    for lo, hi in _row_blocks(rows, vocab):
        g_lp = grad_logprob[lo:hi, None].to(cdt)
        g_h = grad_entropy[lo:hi, None].to(cdt)
        logp = logits[lo:hi].to(cdt) * inv_temp - logz[lo:hi, None].to(cdt)
        p = logp.exp()
        grad = p * (-g_lp - g_h * (logp + entropy[lo:hi, None].to(cdt)))
        grad = torch.where(p > 0, grad, torch.zeros_like(grad))  # -inf logits: no nan
        onehot_grad = torch.where(valid[lo:hi, None], g_lp, torch.zeros_like(g_lp))
        grad.scatter_add_(-1, idx[lo:hi, None], onehot_grad)
        out[lo:hi] = grad * inv_temp
    return out
