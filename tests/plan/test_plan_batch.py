"""Run-plan batch arithmetic: optimizer steps per rollout and the LR horizon (in optimizer
steps) against hand-computed numbers; divisibility errors name the keys and the numbers."""
import pytest

from megatron_rl.config import ConfigError, load_experiment_config
from megatron_rl.plan import PlanError, resolve_plan

BASE = ["data.train_batch_size=8", "rollout.n=4", "trainer.total_steps=10"]   # 32 samples per step


def plan(*overrides, world_size=1, device="cpu"):
    return resolve_plan(load_experiment_config(None, BASE + list(overrides)), world_size=world_size, device=device)


@pytest.mark.parametrize("world,overrides,dp,mini,per_rank,steps", [
    (1, [], 1, 32, 32, 1),                                               # DP=1, whole step
    (2, [], 2, 32, 16, 1),                                               # DP=2, whole step
    (1, ["actor.mini_batch_size=8"], 1, 8, 8, 4),                        # mini-batch smaller than the step
    (2, ["actor.mini_batch_size=8"], 2, 8, 4, 4),                        # global mini-batch over DP=2
    (2, ["actor.mini_batch_size=16", "actor.ppo_epochs=2"], 2, 16, 8, 4),
    (4, ["model.tp=2", "actor.mini_batch_size=16", "actor.ppo_epochs=2"], 2, 16, 8, 4),   # DP = 4 / TP
])
def test_optimizer_steps_and_lr_horizon(world, overrides, dp, mini, per_rank, steps):
    p = plan(*overrides, world_size=world)
    b = p.batch
    assert (p.layout.dp, b.samples_per_step, b.samples_per_dp_rank) == (dp, 32, 32 // dp)
    assert (b.mini_batch_samples, b.mini_batch_samples_per_rank, b.optimizer_steps_per_rollout) == (mini, per_rank, steps)
    assert b.lr_horizon_steps == 10 * steps
    actor = p.role("actor")
    assert (actor.mini_batch_samples_per_rank, actor.optimizer_steps_per_rollout, actor.lr_horizon_steps) == \
        (per_rank, steps, 10 * steps)


def test_micro_batches_per_mini_batch_fixed_rows_and_packed():
    assert plan("actor.mini_batch_size=16", "actor.micro_batch_size=3", world_size=2).batch.microbatches_per_mini_batch == 3
    # packing: 8 rows x (512 + 64) tokens per rank into 2048-token micro-batches -> ceil(4608 / 2048)
    packed = plan("actor.mini_batch_size=16", "actor.max_tokens_per_microbatch=2048", world_size=2).batch
    assert (packed.max_sample_tokens, packed.microbatches_per_mini_batch) == (576, 3)


def test_critic_has_its_own_mini_batch_and_epochs():
    p = plan("critic.enable=true", "algos.adv_estimator=gae", "actor.mini_batch_size=16", "critic.mini_batch_size=8",
             "critic.ppo_epochs=2", "critic.micro_batch_size=2", world_size=2)
    c = p.role("critic")
    assert (c.micro_batch_size, c.mini_batch_samples, c.mini_batch_samples_per_rank) == (2, 8, 4)
    assert (c.optimizer_steps_per_rollout, c.lr_horizon_steps) == (8, 80)
    inherit = plan("critic.enable=true", "algos.adv_estimator=gae", "actor.mini_batch_size=16").role("critic")
    assert (inherit.mini_batch_samples, inherit.optimizer_steps_per_rollout, inherit.micro_batch_size) == (16, 2, 4)


def test_critic_warmup_leaves_actor_steps_out_of_the_horizon():
    p = plan("critic.enable=true", "algos.adv_estimator=gae", "trainer.critic_warmup=3", "actor.mini_batch_size=16")
    assert p.role("actor").lr_horizon_steps == (10 - 3) * 2
    assert p.role("critic").lr_horizon_steps == 10 * 2


def test_gad_discriminator_steps_and_sft_warmup():
    p = plan("gad.enable=true", "gad.d_updates=2", "gad.freeze_discriminator_after=4", "trainer.critic_warmup=3",
             "gad.d_micro_batch_size=2")
    d = p.role("discriminator")
    assert (d.micro_batch_size, d.optimizer_steps_per_rollout, d.lr_horizon_steps) == (2, 2, 4 * 2)
    assert p.recipe == "gad" and p.role("actor").lr_horizon_steps == 7 + 3   # 7 RL steps + 3 SFT warm-up steps
    frozen = plan("gad.enable=true", "trainer.critic_warmup=3", "gad.warmup_student=frozen")
    assert frozen.role("actor").lr_horizon_steps == 7


@pytest.mark.parametrize("world,overrides,match", [
    (3, [], r"data.train_batch_size=8 \(global prompts per step\) is not divisible by the data-parallel size dp=3"),
    (4, ["actor.mini_batch_size=6"], r"actor.mini_batch_size=6 .* not divisible by the data-parallel size dp=4"),
    (1, ["actor.mini_batch_size=12"], r"samples per step \(data.train_batch_size x rollout.n = 32\) is not "
                                      r"divisible by actor.mini_batch_size=12"),
    (1, ["actor.mini_batch_size=64"], r"actor.mini_batch_size=64 exceeds the samples per step"),
    (1, ["critic.enable=true", "algos.adv_estimator=gae", "critic.mini_batch_size=12"],
     r"divisible by critic.mini_batch_size=12"),
    (1, ["actor.max_tokens_per_microbatch=100"], r"actor.max_tokens_per_microbatch=100 is below the longest sample"),
    (1, ["algos.adv_estimator=gae"], r"algos.adv_estimator=gae needs values from a critic"),
])
def test_divisibility_errors_name_the_keys(world, overrides, match):
    with pytest.raises(PlanError, match=match):
        plan(*overrides, world_size=world)


def test_plan_errors_are_config_errors():
    assert issubclass(PlanError, ConfigError)
