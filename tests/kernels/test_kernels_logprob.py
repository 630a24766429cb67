"""token_logprob_entropy (torch reference path) against plain float64 autograd."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from megatron_rl.kernels import reference, token_logprob_entropy
from megatron_rl.kernels.backends import triton_available

VOCAB = 37


def _naive(logits, labels, temperature=1.0):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _inputs(shape=(3, 5), vocab=VOCAB, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g, dtype=dtype) * 3).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=g)
    g_lp, g_h = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
    return logits, labels, g_lp, g_h


def _value_and_grad(fn, logits, labels, g_lp, g_h, **kw):
    lp, h = fn(logits, labels, **kw)
    (grad,) = torch.autograd.grad((lp * g_lp + h * g_h).sum(), logits)
    return lp.detach(), h.detach(), grad


@pytest.fixture
def small_row_blocks(monkeypatch):
    """Force several row blocks so block boundaries are exercised."""
    monkeypatch.setattr(reference, "ROW_BLOCK_ELEMS", 2 * VOCAB)


def test_reference_matches_float64_autograd_values_and_grads(small_row_blocks):
    args = _inputs()
    lp, h, grad = _value_and_grad(token_logprob_entropy, *args)
    lp0, h0, grad0 = _value_and_grad(_naive, *args)
    assert lp.dtype == torch.float64 and lp.shape == (3, 5)
    torch.testing.assert_close(lp, lp0, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h0, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, grad0, atol=1e-10, rtol=0)


def test_temperature_divides_logits():
    args = _inputs(seed=1)
    lp, h, grad = _value_and_grad(token_logprob_entropy, *args, temperature=0.7)
    lp0, h0, grad0 = _value_and_grad(_naive, *args, temperature=0.7)
    torch.testing.assert_close(lp, lp0, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h0, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, grad0, atol=1e-10, rtol=0)


def test_inplace_backward_equals_out_of_place_and_reuses_logits_buffer():
    leaf, labels, g_lp, g_h = _inputs(seed=2)
    expected = _value_and_grad(token_logprob_entropy, leaf, labels, g_lp, g_h)[2]
    logits = leaf * 1.0  # a non-leaf, as an LM head's output is
    lp, h = token_logprob_entropy(logits, labels, inplace_backward=True)
    (grad,) = torch.autograd.grad((lp * g_lp + h * g_h).sum(), logits)
    assert grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_inplace_backward_refused_for_leaf_logits():
    leaf, labels, g_lp, g_h = _inputs(seed=3)
    before = leaf.detach().clone()
    with pytest.warns(UserWarning, match="inplace_backward ignored"):
        lp, h = token_logprob_entropy(leaf, labels, inplace_backward=True)
    (lp * g_lp + h * g_h).sum().backward()
    assert torch.equal(leaf.detach(), before)


def test_logprob_only_loss_gives_softmax_minus_onehot_grad():
    logits, labels, _, _ = _inputs(shape=(4,), seed=4)
    lp, _ = token_logprob_entropy(logits, labels)
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    expected = torch.nn.functional.one_hot(labels, VOCAB) - torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(grad, expected.to(grad.dtype), atol=1e-12, rtol=0)


def test_bf16_logits_give_float32_outputs_close_to_float64():
    logits, labels, g_lp, g_h = _inputs(shape=(6, 4), vocab=300, seed=5)
    bf16 = logits.detach().bfloat16().requires_grad_()
    lp, h, grad = _value_and_grad(token_logprob_entropy, bf16, labels, g_lp.float(), g_h.float())
    lp0, h0, grad0 = _value_and_grad(_naive, bf16.detach().double().requires_grad_(), labels, g_lp, g_h)
    assert lp.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double(), lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), h0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad0, atol=2e-3, rtol=1e-2)


def test_minus_inf_logits_give_finite_entropy_and_grad():
    logits, labels, g_lp, g_h = _inputs(shape=(3,), seed=6)
    masked = logits.detach().clone()
    masked[:, -5:] = float("-inf")
    labels = labels.clamp(max=VOCAB - 6)
    lp, h, grad = _value_and_grad(token_logprob_entropy, masked.requires_grad_(), labels, g_lp, g_h)
    lp0, h0, _ = _value_and_grad(_naive, logits.detach()[:, :-5].clone().requires_grad_(), labels, g_lp, g_h)
    torch.testing.assert_close(h, h0, atol=1e-10, rtol=0)
    assert torch.isfinite(grad).all() and torch.all(grad[:, -5:] == 0)


def test_labels_shape_mismatch_names_both_shapes():
    logits = torch.randn(2, 3, VOCAB)
    with pytest.raises(ValueError, match=r"labels shape \(2,\).*\(2, 3, 37\)"):
        token_logprob_entropy(logits, torch.zeros(2, dtype=torch.long))


_INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from megatron_rl.kernels import reference, triton_logprob
    from megatron_rl.kernels.logprob import combine_partials
    triton_logprob.CONFIG.update(fwd=(2, 16, 4), bwd=(2, 16, 4))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 50, generator=g) * 3
    labels = torch.randint(-5, 55, (7,), generator=g)  # some labels on "another rank"
    ref = reference.partials(z, labels, 0.8)
    tri = triton_logprob.partials(z, labels, 0.8)
    for a, b in zip(ref, tri):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    logprob, entropy, logz = combine_partials(*ref, None)
    g_lp, g_h = torch.randn(7, generator=g), torch.randn(7, generator=g)
    out_ref = reference.backward(z, labels, 0.8, logz, entropy, g_lp, g_h, torch.empty_like(z))
    zb = z.clone()
    out_tri = triton_logprob.backward(zb, labels, 0.8, logz, entropy, g_lp, g_h, zb)  # in place
    torch.testing.assert_close(out_tri, out_ref, atol=1e-6, rtol=1e-5)
    print("OK")
""")


def _triton_interpreter_usable() -> bool:
    """Triton's CPU interpreter before 3.9 breaks on numpy >= 2.4 (int() of a 1-element array)."""
    if not triton_available():
        return False
    import triton
    return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)


@pytest.mark.skipif(not _triton_interpreter_usable(), reason="needs triton >= 3.9 (CPU interpreter)")
def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
