"""linear_token_logprob (LM head fused, chunked over tokens) against plain float64 autograd."""
import pytest
import torch

from megatron_rl.kernels import linear_token_logprob

B, T, H, V = 3, 5, 16, 41


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, labels, torch.randn(B, T, generator=g, dtype=torch.float64), \
        torch.randn(B, T, generator=g, dtype=torch.float64)


def _naive(hidden, weight, labels, temperature):
    logp = torch.log_softmax(hidden @ weight.T / temperature, -1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_tokens", [4, None], ids=["chunked", "one-chunk"])
def test_linear_matches_matmul_then_log_softmax(chunk_tokens):
    hidden, weight, labels, g_lp, g_h = _inputs()
    lp, h = linear_token_logprob(hidden, weight, labels, temperature=0.8, chunk_tokens=chunk_tokens)
    grads = torch.autograd.grad((lp * g_lp + h * g_h).sum(), (hidden, weight))
    lp0, h0 = _naive(hidden, weight, labels, 0.8)
    grads0 = torch.autograd.grad((lp0 * g_lp + h0 * g_h).sum(), (hidden, weight))
    torch.testing.assert_close(lp, lp0.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h0.detach(), atol=1e-10, rtol=0)
    for got, want in zip(grads, grads0):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_linear_weight_only_grad_leaves_hidden_without_grad():
    hidden, weight, labels, g_lp, _ = _inputs(seed=1)
    lp, _ = linear_token_logprob(hidden.detach(), weight, labels, chunk_tokens=4)
    (gw,) = torch.autograd.grad((lp * g_lp).sum(), weight)
    lp0, _ = _naive(hidden.detach(), weight, labels, 1.0)
    (gw0,) = torch.autograd.grad((lp0 * g_lp).sum(), weight)
    torch.testing.assert_close(gw, gw0, atol=1e-10, rtol=0)


def test_linear_rejects_weight_with_wrong_hidden_size():
    hidden, weight, labels, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"weight must be \[vocab_local, 16\]"):
        linear_token_logprob(hidden, weight[:, :8], labels)
