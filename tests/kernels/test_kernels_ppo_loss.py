"""token_weighted_ppo_loss equals megatron_rl.algos applied to float64 reference log-probs."""
import pytest
import torch

from megatron_rl.algos import actor_loss
from megatron_rl.kernels import token_weighted_ppo_loss

B, T, V = 3, 6, 29


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        cur = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = cur + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # some ratios get clipped
    ref = cur + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return dict(logits=logits, labels=labels, old_logprob=old, ref_logprob=ref, advantages=adv, mask=mask,
                token_weights=weights)


def _reference_loss(b, loss_mode, apply_to, clip):
    logp = torch.log_softmax(b["logits"], -1)
    logprob = logp.gather(-1, b["labels"][..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return actor_loss(b["old_logprob"], logprob, b["advantages"], b["mask"], policy_loss=loss_mode,
                      policy_loss_kwargs=clip, agg_mode="seq-mean-token-mean", token_weights=b["token_weights"],
                      token_weights_apply_to=apply_to, ref_logprob=b["ref_logprob"], kl_coef=0.1,
                      kl_kind="low_var_kl", entropy=entropy, entropy_coef=0.01)


CASES = [("ppo", dict(clip_low=0.2, clip_high=0.28, clip_c=3.0)), ("gspo", dict(clip_low=3e-4, clip_high=4e-4))]


@pytest.mark.parametrize("apply_to", ["pg", "mask"])
@pytest.mark.parametrize("loss_mode,clip", CASES, ids=[c[0] for c in CASES])
def test_fused_loss_matches_algos_values_and_grads(loss_mode, clip, apply_to):
    b = _batch()
    loss, metrics = token_weighted_ppo_loss(
        b["logits"], b["labels"], b["old_logprob"], b["advantages"], b["mask"], token_weights=b["token_weights"],
        ref_logprob=b["ref_logprob"], kl_coef=0.1, entropy_coef=0.01, loss_mode=loss_mode,
        agg_mode="seq-mean-token-mean", token_weights_apply_to=apply_to, **clip)
    (grad,) = torch.autograd.grad(loss, b["logits"])
    ref_loss, ref_metrics = _reference_loss(b, loss_mode, apply_to, clip)
    (ref_grad,) = torch.autograd.grad(ref_loss, b["logits"])
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], atol=1e-10, rtol=0)


def test_token_weights_pg_and_mask_give_different_losses():
    b = _batch(seed=1)
    common = dict(token_weights=b["token_weights"], ref_logprob=b["ref_logprob"], kl_coef=0.1, entropy_coef=0.01)
    args = (b["logits"], b["labels"], b["old_logprob"], b["advantages"], b["mask"])
    pg, _ = token_weighted_ppo_loss(*args, token_weights_apply_to="pg", **common)
    masked, _ = token_weighted_ppo_loss(*args, token_weights_apply_to="mask", **common)
    assert abs(pg.item() - masked.item()) > 1e-4


def test_unit_token_weights_equal_no_weights():
    b = _batch(seed=2)
    args = (b["logits"], b["labels"], b["old_logprob"], b["advantages"], b["mask"])
    plain, _ = token_weighted_ppo_loss(*args, entropy_coef=0.01)
    ones, _ = token_weighted_ppo_loss(*args, token_weights=torch.ones_like(b["mask"]),
                                      token_weights_apply_to="mask", entropy_coef=0.01)
    torch.testing.assert_close(plain, ones, atol=1e-12, rtol=0)
