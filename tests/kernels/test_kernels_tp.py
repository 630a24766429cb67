"""Vocab-parallel (TP=2, gloo) log-prob/entropy, loss and LM-head form equal the unsplit TP=1 result."""
import pytest
import torch
import torch.distributed as dist

from megatron_rl.kernels import linear_token_logprob, token_logprob_entropy, token_weighted_ppo_loss
from tests.helpers import run_multiproc

B, T, V = 2, 5, 40  # V split in halves of 20


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = torch.tensor([0, V - 1])  # first id of rank 0, last id of rank 1
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0
    return logits, labels, old, ref, adv, weights, mask


def _loss(logits, labels, old, ref, adv, weights, mask, tp_group=None):
    lp, h = token_logprob_entropy(logits, labels, tp_group=tp_group, temperature=0.9)
    loss, _ = token_weighted_ppo_loss(logits, labels, old, adv, mask, token_weights=weights, ref_logprob=ref,
                                      kl_coef=0.1, entropy_coef=0.01, token_weights_apply_to="mask",
                                      tp_group=tp_group, temperature=0.9)
    return lp, h, loss


def _tp_worker(rank, world):
    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    logits, labels, *rest = _inputs()
    full = logits.clone().requires_grad_()
    lp1, h1, loss1 = _loss(full, labels, *rest)
    (grad1,) = torch.autograd.grad(loss1 + (lp1 + h1).sum(), full)
    half = V // 2
    local = logits[..., rank * half:(rank + 1) * half].clone().requires_grad_()
    lp2, h2, loss2 = _loss(local, labels, *rest, tp_group=group)
    (grad2,) = torch.autograd.grad(loss2 + (lp2 + h2).sum(), local)
    torch.testing.assert_close(lp2, lp1, atol=1e-12, rtol=0)
    torch.testing.assert_close(h2, h1, atol=1e-12, rtol=0)
    torch.testing.assert_close(loss2, loss1, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad2, grad1[..., rank * half:(rank + 1) * half], atol=1e-12, rtol=0)
    _check_linear_tp(rank, group)
    dist.destroy_process_group()


def _check_linear_tp(rank, group):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    half = V // 2
    results = []
    for w, grp in ((weight, None), (weight[rank * half:(rank + 1) * half], group)):
        h_in, w_in = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = linear_token_logprob(h_in, w_in, labels, tp_group=grp, chunk_tokens=3)
        results.append((lp, ent, *torch.autograd.grad((lp + 0.5 * ent).sum(), (h_in, w_in))))
    (lp1, h1, gh1, gw1), (lp2, h2, gh2, gw2) = results
    torch.testing.assert_close(lp2, lp1, atol=1e-12, rtol=0)
    torch.testing.assert_close(h2, h1, atol=1e-12, rtol=0)
    torch.testing.assert_close(gh2, gh1, atol=1e-12, rtol=0)
    torch.testing.assert_close(gw2, gw1[rank * half:(rank + 1) * half], atol=1e-12, rtol=0)


@pytest.mark.multiproc
def test_tp2_vocab_split_matches_tp1_values_and_grads():
    run_multiproc(_tp_worker, world=2)
