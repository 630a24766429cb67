"""`token_weights.apply_to`: pg vs mask through the loss the trainer calls, on hand-made
tensors; and fractional weights staying fractional from the reward to the gradient."""
import math

import pytest
import torch

from megatron_rl.kernels import token_weighted_ppo_loss

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
W = torch.tensor([[0.5, 2.0, 1.0], [0.25, 1.0, 1.0]])
ADV = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
LABELS = torch.zeros(2, 3, dtype=torch.long)
# two-token vocabulary: logits [0, x] give p(label 0) = 1 / (1 + e^x)
X = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.5, 0.0]])
LOGITS = torch.stack([torch.zeros_like(X), X], -1)
LOGP = -torch.log1p(torch.exp(X))                               # log p(label)
P0 = LOGP.exp()
ENT = -(P0 * P0.log() + (1 - P0) * (1 - P0).log())
REF = LOGP - torch.tensor([[0.2, 0.4, 0.0], [0.6, 0.0, 0.0]])   # k1 KL = logp - ref


def loss(apply_to):
    return token_weighted_ppo_loss(LOGITS, LABELS, LOGP, ADV, MASK, token_weights=W, ref_logprob=REF,
                                   kl_kind="kl", kl_coef=0.1, entropy_coef=0.01, agg_mode="token-mean",
                                   token_weights_apply_to=apply_to)


def test_pg_scales_the_policy_term_only_and_keeps_token_count_denominators():
    total, m = loss("pg")
    ent = (ENT[0, 0] + ENT[0, 1] + ENT[1, 0]).item() / 3
    assert m["pg_loss"] == pytest.approx(-(0.5 * 1 + 2.0 * 1 + 0.25 * 2) / 3, abs=1e-6)
    assert m["kl_loss"] == pytest.approx((0.2 + 0.4 + 0.6) / 3, abs=1e-6)        # unweighted
    assert m["entropy"] == pytest.approx(ent, abs=1e-6)                          # unweighted
    assert total.item() == pytest.approx(-1.0 + 0.1 * 0.4 - 0.01 * ent, abs=1e-6)


def test_mask_scales_every_term_and_divides_by_the_sum_of_weights():
    total, m = loss("mask")
    ent = (0.5 * ENT[0, 0] + 2.0 * ENT[0, 1] + 0.25 * ENT[1, 0]).item() / 2.75
    kl = (0.5 * 0.2 + 2.0 * 0.4 + 0.25 * 0.6) / 2.75
    assert m["pg_loss"] == pytest.approx(-(0.5 + 2.0 + 0.5) / 2.75, abs=1e-6)
    assert m["kl_loss"] == pytest.approx(kl, abs=1e-6)
    assert m["entropy"] == pytest.approx(ent, abs=1e-6)
    assert total.item() == pytest.approx(-3.0 / 2.75 + 0.1 * kl - 0.01 * ent, abs=1e-6)


def test_config_apply_to_is_what_the_loss_reads():
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.token_weights import TokenWeightsConfig, build_token_weights

    cfg = type("Cfg", (), {})()
    cfg.algos = AlgosConfig(token_weights_apply_to="pg")
    cfg.token_weights = TokenWeightsConfig(source="reward", apply_to="mask")
    build_token_weights(cfg, actor=None, tokenizer=None)
    assert cfg.algos.token_weights_apply_to == "mask"


def test_fractional_reward_weights_stay_fractional_to_the_gradient():
    from megatron_rl.data.batch import Batch
    from megatron_rl.rewards import RewardManager
    from megatron_rl.rewards.config import RewardConfig
    from megatron_rl.rewards.registry import REWARDS, register_reward
    from megatron_rl.token_weights import TokenWeightsConfig
    from megatron_rl.token_weights.phase import RewardWeights
    from megatron_rl.trainer.microbatch import make_microbatches

    if "tw_fractional" not in REWARDS:
        register_reward("tw_fractional")(lambda response, sample, **kw: {"score": 1.0, "token_weights": [0.5, 0.25]})
    batch = Batch({"prompt_ids": torch.zeros(2, 2, dtype=torch.long), "prompt_mask": torch.ones(2, 2, dtype=torch.long),
                   "response_ids": LABELS.clone(), "response_mask": MASK.long()},     # an integer mask on purpose
                  [{"uid": "a"}, {"uid": "b"}])
    with RewardManager(RewardConfig(name="tw_fractional", num_workers=0)) as rm:
        rm.score_batch(batch, ["x", "y"])
    RewardWeights(TokenWeightsConfig(source="reward"))(None, batch)
    assert batch["token_weights"].dtype == torch.float32
    assert batch["token_weights"].tolist() == [[0.5, 0.25, 1.0], [0.5, 0.25, 1.0]]
    batch["old_logprob"], batch["advantages"] = LOGP.clone(), ADV.clone()
    mb = make_microbatches(batch, 2)[0]
    assert mb["token_weights"].dtype == torch.float32 and mb["token_weights"][0, 1].item() == 0.25
    logits = LOGITS.clone().requires_grad_(True)
    out, m = token_weighted_ppo_loss(logits, mb["labels"], mb["old_logprob"], mb["advantages"],
                                     mb["response_mask"], token_weights=mb["token_weights"])
    out.backward()
    # d pg / d logit_1 = -A * w / n * d logp / d x = -A * w / 3 * -(1 - p0); 0.25 * 1 / 3 must not round to 0
    expect = ADV * batch["token_weights"] * MASK / 3 * (1 - P0)
    assert torch.allclose(logits.grad[..., 1], expect, atol=1e-6)
    assert logits.grad[0, 1, 1].item() == pytest.approx(0.25 / 3 * (1 - P0[0, 1].item()), abs=1e-7)
    assert not math.isclose(logits.grad[0, 1, 1].item(), 0.0)
