"""Strength predictor: policy shape/bounds, GRPO loss, learning on a bandit, one step on a tiny LLM."""
import pytest
import torch

from megatron_rl.steering import SteeringController, build_intervention
from megatron_rl.steering.config import PredictorConfig
from megatron_rl.steering.predictor import StrengthPredictor, group_index, predictor_pg_loss, prompt_repr
from megatron_rl.steering.predictor_trainer import StrengthPredictorTrainer, build_predictor
from tests.steering.conftest import logits_of, make_sae


def test_mean_is_bounded_and_starts_mid_range():
    torch.manual_seed(0)
    pred = StrengthPredictor(8, 3, hidden=16, min_strength=-1.0, max_strength=5.0)
    x = torch.randn(4, 8) * 100
    assert torch.allclose(pred.mean(x), torch.full((4, 3), 2.0))
    with torch.no_grad():
        pred.net[-1].weight.normal_(std=10.0)
    mu = pred.mean(x)
    assert mu.min() >= -1.0 and mu.max() <= 5.0 and mu.std() > 0.5


def test_sample_groups_rows_per_prompt_and_logprob_is_normal():
    pred = StrengthPredictor(8, 2, hidden=16, init_std=0.5)
    x = torch.randn(3, 8)
    s, lp = pred.sample(x, n=4, generator=torch.Generator().manual_seed(0))
    assert s.shape == (12, 2) and lp.shape == (12,) and lp.requires_grad and not s.requires_grad
    want = torch.distributions.Normal(torch.zeros(12, 2), 0.5).log_prob(s).sum(-1)    # mean 0 at init
    assert torch.allclose(lp, want, atol=1e-6)
    assert group_index(3, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_pg_loss_uses_group_normalised_advantages():
    lp = torch.zeros(4, requires_grad=True)
    loss = predictor_pg_loss(lp, torch.tensor([1.0, 3.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 1]))
    loss.backward()
    # group 0: (1-2)/std, (3-2)/std with std = sqrt(2); group 1 has zero std -> 0
    a = 1 / 2 ** 0.5
    assert torch.allclose(lp.grad, torch.tensor([a, -a, 0.0, 0.0]) / 4, atol=1e-5)
    assert loss.item() == 0.0


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add contention (7 ms per LayerNorm on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learns_a_contextual_bandit(one_thread):
    """reward = -(s - s*(prompt))^2 with s* a bounded function of the prompt representation."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    target = torch.stack([2.0 * torch.tanh(x[:, 0]), -1.0 + x[:, 1].clamp(-1, 1)], -1)     # [32, 2]
    pred = StrengthPredictor(8, 2, hidden=32, min_strength=-3.0, max_strength=3.0, init_std=1.0)
    trainer = StrengthPredictorTrainer(pred, lr=1e-2, feature_names=[11, 42])
    err0 = (pred.mean(x) - target).pow(2).mean().item()
    for _ in range(300):
        s, _ = pred.sample(x, n=8)
        rewards = -(s - target.repeat_interleave(8, 0)).pow(2).sum(-1)
        metrics = trainer.step(x, s, rewards, group_index(32, 8))
    err = (pred.mean(x) - target).pow(2).mean().item()
    assert err < 0.1 * err0, (err0, err)
    assert metrics["steering/policy_std/11"] < 0.7        # learned std shrinks as the policy sharpens
    assert {"steering/strength_mean/11", "steering/strength_std/42", "steering/predictor_loss"} <= set(metrics)


def test_state_dict_round_trip():
    pred = StrengthPredictor(8, 2, hidden=16)
    tr = StrengthPredictorTrainer(pred, lr=1e-2)
    x = torch.randn(4, 8)
    s, _ = pred.sample(x, n=2)
    tr.step(x, s, torch.randn(8), group_index(4, 2))
    state = tr.state_dict()
    tr2 = StrengthPredictorTrainer(StrengthPredictor(8, 2, hidden=16), lr=1e-2)
    tr2.load_state_dict(state)
    assert torch.equal(tr2.predictor.mean(x), pred.mean(x)) and tr2.steps == 1
    assert tr2.optimizer.state_dict()["state"][0]["step"] == tr.optimizer.state_dict()["state"][0]["step"]


def test_trainer_rejects_unfrozen_llm_and_shared_params():
    llm = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="requires_grad=True"):
        StrengthPredictorTrainer(StrengthPredictor(8, 1, hidden=4), frozen_llm=llm)
    llm.requires_grad_(False)
    pred = StrengthPredictor(8, 1, hidden=4)
    pred.leak = llm                                     # an LLM module registered inside the predictor
    with pytest.raises(AssertionError, match="leak.weight"):
        StrengthPredictorTrainer(pred, frozen_llm=llm)


def test_prompt_repr_pools_real_tokens(tiny_model):
    from megatron_rl.steering import capture_layer_output

    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, :2] = 0                                        # left padding
    with capture_layer_output(tiny_model, 1) as cap:
        from megatron_rl.models.forward import gpt_forward
        with torch.no_grad():
            gpt_forward(tiny_model, ids, am)
    h = cap["hidden"].transpose(0, 1)
    mean = prompt_repr(tiny_model, ids, am, layer=1, mode="mean")
    last = prompt_repr(tiny_model, ids, am, layer=1, mode="last")
    assert torch.allclose(mean[1], h[1, 2:].mean(0), atol=1e-6) and torch.allclose(mean[0], h[0].mean(0), atol=1e-6)
    assert torch.equal(last, h[:, -1])


def test_one_step_on_tiny_megatron_model_with_steered_reward(tiny_model):
    """Reward = log p(token 42) at the last position under steering along its unembedding: the
    predictor's mean strength goes up, the LLM is untouched."""
    torch.manual_seed(0)
    tok, n = 42, 4
    u = tiny_model.embedding.word_embeddings.weight[tok].detach().clone()
    sae = make_sae(layer=3, rows={0: u / u.norm()})
    ctl = SteeringController(build_intervention("add", sae, feature_idxs=[0]), 3)
    assert ctl.attach(tiny_model)
    llm_before = {k: v.clone() for k, v in tiny_model.state_dict().items() if torch.is_tensor(v)}
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    cfg = PredictorConfig(enable=True, repr="mean", repr_layer=1, hidden=16, min_strength=0.0,
                          max_strength=8.0, init_std=1.0, lr=5e-2, n_samples=n)
    try:
        reprs = prompt_repr(tiny_model, ids, None, cfg.repr_layer, cfg.repr, steering=ctl)
        pred, trainer = build_predictor(cfg, 64, 1, frozen_llm=tiny_model, feature_names=[0])
        mean0 = pred.mean(reprs).mean().item()
        for _ in range(5):
            s, _ = pred.sample(reprs, n)
            ctl.set_strengths(s)
            logp = logits_of(tiny_model, ids.repeat_interleave(n, 0)).log_softmax(-1)[:, -1, tok]
            metrics = trainer.step(reprs, s, logp, group_index(2, n))
    finally:
        ctl.detach()
    assert pred.mean(reprs).mean().item() > mean0 + 0.1
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in llm_before.items())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert set(metrics) >= {"steering/strength_mean/0", "steering/strength_std/0", "steering/reward_mean"}


def test_non_finite_gradient_skips_the_step_and_is_counted():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    pred = StrengthPredictor(8, 1, hidden=16)
    trainer = StrengthPredictorTrainer(pred, lr=1e-2)
    before = {k: v.clone() for k, v in pred.state_dict().items()}
    s, _ = pred.sample(x, n=2)
    bad = x.clone()
    bad[1, 0] = float("nan")                       # a non-finite prompt representation
    metrics = trainer.step(bad, s, torch.arange(8.0), group_index(4, 2))
    assert metrics["steering/skipped_steps"] == 1.0 and trainer.steps == 0
    assert all(torch.equal(v, pred.state_dict()[k]) for k, v in before.items())
    metrics = trainer.step(x, s, torch.arange(8.0), group_index(4, 2))
    assert metrics["steering/skipped_steps"] == 0.0 and trainer.steps == 1
