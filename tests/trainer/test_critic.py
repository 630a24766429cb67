"""The PPO critic: per-token values, clipped value-loss updates through Megatron's
schedule, checkpoint round-trip, and GAE end to end in `megatron-rl train`."""
import json
import math

import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc


def value_batch(seed=0, b=3, p=5, r=6, vocab=96):
    """Ragged batch: a left-padded prompt, two right-padded responses, fixed returns."""
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, :2] = 0
    resp_mask = torch.ones(b, r)
    resp_mask[1, 4:] = 0
    resp_mask[2, 2:] = 0
    return Batch({"prompt_ids": torch.randint(0, vocab, (b, p), generator=g), "prompt_mask": prompt_mask,
                  "response_ids": torch.randint(0, vocab, (b, r), generator=g), "response_mask": resp_mask,
                  "returns": (torch.rand(b, r, generator=g) * 2 - 1) * resp_mask},
                 [{"uid": str(i), "group": i} for i in range(b)])


def make_critic(hf, lr=1e-3, micro_batch_size=2, cls=None):
    """A Critic (or another ValueModel `cls`, e.g. the GAD Discriminator) on `hf`, float32, Adam."""
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.value_head import attach_value_head
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.critic import Critic

    model = load_checkpoint(hf, layer_spec="local")
    attach_value_head(model, seed=0)
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=lr, clip_grad=1.0), "float32", 10)
    return (cls or Critic)(ddp, opt, sched, micro_batch_size)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_rl.parallel import init_distributed

    init_distributed()
    return make_tiny_hf(tmp_path_factory.mktemp("critic_hf"), "llama", tie=False)


def configs(clip=0.5, epochs=1):
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import CriticConfig

    return AlgosConfig(adv_estimator="gae"), CriticConfig(enable=True, cliprange_value=clip, ppo_epochs=epochs)


def test_values_are_per_response_token_and_zero_outside_mask(tiny_hf):
    from megatron_rl.models.value_head import value_forward
    from megatron_rl.trainer.microbatch import model_inputs

    critic = make_critic(tiny_hf)
    batch = value_batch()
    values = critic.compute_values(batch)
    assert values.shape == (3, 6) and values.dtype == torch.float32
    mask = batch["response_mask"] > 0
    assert (values[~mask] == 0).all() and (values[mask] != 0).all()
    # response token t is valued at the position that predicts it: P-1+t of prompt ++ response
    ids, am = model_inputs(batch)
    with torch.no_grad():
        full = value_forward(critic.model, ids, am)        # [B, P+R], one forward, no micro-batches
    expect = full[:, 4:10] * mask.float()
    assert (values - expect).abs().max() < 1e-5


def test_update_loss_is_the_clipped_value_loss_of_the_batch(tiny_hf):
    from megatron_rl.algos.value_loss import value_loss

    critic = make_critic(tiny_hf)
    batch = value_batch()
    batch["values"] = critic.compute_values(batch)
    expect, _ = value_loss(batch["values"], batch["values"], batch["returns"], batch["response_mask"], 0.5)
    algos, ccfg = configs()
    m = critic.update(batch, algos, ccfg)       # 2 micro-batches (2 + 1 padded row), weighted by tokens
    assert m["critic/vf_loss"] == pytest.approx(float(expect), rel=1e-5)
    assert m["critic/vf_clipfrac"] == 0.0
    assert m["critic/grad_norm"] > 0
    valid = batch["response_mask"] > 0
    assert m["critic/values_mean"] == pytest.approx(float(batch["values"][valid].mean()), rel=1e-4, abs=1e-6)


def test_repeated_updates_fit_the_returns(tiny_hf):
    critic = make_critic(tiny_hf, lr=3e-3)
    batch = value_batch()
    algos, ccfg = configs(epochs=2)
    losses = []
    for _ in range(4):
        batch["values"] = critic.compute_values(batch)
        losses.append(critic.update(batch, algos, ccfg)["critic/vf_loss"])
    assert losses[-1] < 0.5 * losses[0], losses


def test_update_without_returns_names_the_missing_tensor(tiny_hf):
    critic = make_critic(tiny_hf)
    batch = value_batch()
    batch["values"] = torch.zeros(3, 6)
    del batch.tensors["returns"]
    with pytest.raises(KeyError, match="'returns'"):
        critic.update(batch, *configs())


def test_state_dict_round_trip_restores_weights_and_optimizer(tiny_hf, tmp_path):
    algos, ccfg = configs()
    batch = value_batch()
    a = make_critic(tiny_hf)
    batch["values"] = a.compute_values(batch)
    a.update(batch, algos, ccfg)
    torch.save(a.state_dict(), tmp_path / "critic.pt")
    b = make_critic(tiny_hf)
    b.load_state_dict(torch.load(tmp_path / "critic.pt", weights_only=False))
    assert torch.equal(a.compute_values(batch), b.compute_values(batch))
    # Adam's moments came along: one more step moves both critics the same way
    batch["values"] = a.compute_values(batch)
    ma, mb = a.update(batch, algos, ccfg), b.update(batch, algos, ccfg)
    assert ma["critic/vf_loss"] == mb["critic/vf_loss"]
    assert (a.compute_values(batch) - b.compute_values(batch)).abs().max() < 1e-6


# --- `megatron-rl train` with GAE ------------------------------------------------------
def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


GAE = ["algos.adv_estimator=gae", "algos.gamma=1.0", "algos.lam=0.95", "critic.enable=true",
       "critic.optim.lr=1e-3", "trainer.val_before_train=false"]


def test_gae_run_trains_the_critic_and_checkpoints_it(tiny_run):
    from megatron_rl.trainer.main import train_main

    overrides, run_dir = tiny_run
    assert train_main(None, overrides + GAE + ["trainer.total_steps=2"]) == 0
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    for step in (1, 2):
        for key in ("critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm", "critic/values_mean",
                    "actor/pg_loss", "timing/values", "timing/critic"):
            assert key in rows[step], (step, key)
        assert math.isfinite(rows[step]["critic/vf_loss"]) and rows[step]["critic/grad_norm"] > 0
    assert (run_dir / "checkpoints" / "step_000002" / "critic" / "megatron_rl.json").exists()   # its dist-checkpoint


def test_gae_resume_reproduces_uninterrupted_critic(tiny_run, tmp_path):
    from megatron_rl.trainer.main import train_main

    overrides, run_dir = tiny_run
    base = [o for o in overrides if not o.startswith(("logging.run_dir", "trainer.total_steps"))] + GAE
    base += ["trainer.save_every=1", "trainer.resume=auto"]
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    assert train_main(None, base + [f"logging.run_dir={full_dir}", "trainer.total_steps=2"]) == 0
    assert train_main(None, base + [f"logging.run_dir={part_dir}", "trainer.total_steps=1"]) == 0
    assert train_main(None, base + [f"logging.run_dir={part_dir}", "trainer.total_steps=2"]) == 0
    full = {r["step"]: r for r in read_metrics(full_dir)}[2]
    part = {r["step"]: r for r in read_metrics(part_dir)}[2]
    for key in ("critic/vf_loss", "critic/values_mean", "critic/grad_norm", "actor/pg_loss"):
        assert part[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key


def test_critic_warmup_steps_leave_the_actor_alone(tiny_run):
    from megatron_rl.trainer.main import train_main

    overrides, run_dir = tiny_run
    assert train_main(None, overrides + GAE + ["trainer.total_steps=2", "trainer.critic_warmup=1"]) == 0
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert "critic/vf_loss" in rows[1] and "actor/pg_loss" not in rows[1]
    assert "critic/vf_loss" in rows[2] and "actor/pg_loss" in rows[2]


def test_gae_without_critic_is_an_error_naming_both_keys(tiny_run):
    from megatron_rl.trainer.main import train_main

    overrides, _ = tiny_run
    with pytest.raises(ValueError, match=r"algos.adv_estimator=gae.*critic.enable"):
        train_main(None, overrides + ["algos.adv_estimator=gae"])


# --- TP=2 / PP=2 (two gloo processes) against TP=1 ---------------------------------------
def _critic_step(rank, world, hf, tp, pp, out):
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp)
    critic = make_critic(hf)
    batch = value_batch()
    batch["values"] = critic.compute_values(batch)
    metrics = critic.update(batch, *configs())
    after = critic.compute_values(batch)
    if torch.distributed.get_rank() == 0:
        torch.save({"values": batch["values"], "metrics": metrics, "after": after}, out)
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_critic_matches_tp1(tmp_path, tp, pp):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run_multiproc(_critic_step, 1, (hf, 1, 1, str(tmp_path / "ref.pt")))
    run_multiproc(_critic_step, 2, (hf, tp, pp, str(tmp_path / "par.pt")))
    ref, par = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "par.pt")
    assert (ref["values"] - par["values"]).abs().max() < 1e-5
    for k in ("critic/vf_loss", "critic/grad_norm", "critic/values_mean"):
        assert par["metrics"][k] == pytest.approx(ref["metrics"][k], rel=1e-5, abs=1e-6), k
    assert (ref["after"] - ref["values"]).abs().max() > 1e-3
    assert (ref["after"] - par["after"]).abs().max() < 1e-4


def _dp_critic_step(rank, world, hf, out):
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1)
    critic = make_critic(hf)
    probe = value_batch(seed=0)
    before = critic.compute_values(probe)
    batch = value_batch(seed=1 + rank)                 # each DP rank its own rows
    batch["values"] = critic.compute_values(batch)
    critic.update(batch, *configs())
    torch.save({"before": before, "after": critic.compute_values(probe)}, f"{out}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_data_parallel_ranks_keep_one_critic(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    out = str(tmp_path / "dp")
    run_multiproc(_dp_critic_step, 2, (hf, out))
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert (r0["after"] - r0["before"]).abs().max() > 1e-3       # it learned
    assert (r0["after"] - r1["after"]).abs().max() < 1e-6        # from gradients averaged over DP
