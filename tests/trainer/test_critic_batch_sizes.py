"""The critic's own `critic.micro_batch_size` / `critic.mini_batch_size`: micro-batching
changes neither values nor updates, 0 / -1 inherit the actor's, bad values name the key."""
import pytest
import torch

from tests.helpers import make_tiny_hf
from tests.trainer.test_critic import configs, make_critic, value_batch


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from megatron_rl.parallel import init_distributed

    init_distributed()
    return make_tiny_hf(tmp_path_factory.mktemp("critic_sizes_hf"), "llama", tie=False)


def test_values_do_not_depend_on_micro_batch_size(hf):
    batch = value_batch(b=5)
    one, four = make_critic(hf, micro_batch_size=1), make_critic(hf, micro_batch_size=4)
    assert (one.compute_values(batch) - four.compute_values(batch)).abs().max() < 1e-5


def test_update_does_not_depend_on_micro_batch_size(hf):
    algos, ccfg = configs()
    batch = value_batch(b=5)
    one, four = make_critic(hf, micro_batch_size=1), make_critic(hf, micro_batch_size=4)
    batch["values"] = one.compute_values(batch)
    m1, m4 = one.update(batch, algos, ccfg), four.update(batch, algos, ccfg)   # 5 micro-batches vs 2 (1 padded)
    for k in ("critic/vf_loss", "critic/grad_norm", "critic/values_mean"):
        assert m1[k] == pytest.approx(m4[k], rel=1e-5, abs=1e-6), k
    after1, after4 = one.compute_values(batch), four.compute_values(batch)
    assert (after1 - batch["values"]).abs().max() > 1e-3                      # the step moved the values
    assert (after1 - after4).abs().max() < 1e-5


@pytest.mark.parametrize("own,actor,steps", [(-1, 2, 2), (-1, 0, 1), (2, 0, 2), (0, 2, 1), (1, 2, 3)])
def test_mini_batch_size_is_the_critics_own_unless_minus_one(hf, own, actor, steps):
    """3 rows: optimizer steps = ceil(3 / mini), mini = critic.mini_batch_size, or the actor's
    (the `mini_batch_size` argument) at -1; 0 means the whole batch."""
    from megatron_rl.config.schema import CriticConfig

    algos, _ = configs()
    critic = make_critic(hf)
    batch = value_batch()
    batch["values"] = critic.compute_values(batch)
    before = critic.scheduler.num_steps
    critic.update(batch, algos, CriticConfig(enable=True, mini_batch_size=own), mini_batch_size=actor)
    assert critic.scheduler.num_steps - before == steps


@pytest.mark.parametrize("own,expect", [(0, 3), (1, 1)])
def test_build_critic_micro_batch_size_zero_inherits_the_actors(hf, own, expect):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.critic import build_critic

    cfg = load_experiment_config(None, [f"model.path={hf}", "model.layer_spec=local", "model.dtype=float32",
                                        "critic.enable=true", "actor.micro_batch_size=3",
                                        f"critic.micro_batch_size={own}"])
    assert build_critic(cfg, 1).mbs == expect


@pytest.mark.parametrize("key,value", [("micro_batch_size", -1), ("mini_batch_size", -2)])
def test_bad_batch_size_is_a_config_error_naming_the_key(key, value):
    from megatron_rl.config import ConfigError, load_experiment_config

    with pytest.raises(ConfigError, match=rf"critic\.{key} must be"):
        load_experiment_config(None, [f"critic.{key}={value}"])


def test_value_model_rejects_a_zero_micro_batch_size(hf):
    with pytest.raises(ValueError, match="micro_batch_size must be > 0"):
        make_critic(hf, micro_batch_size=0)


# --- the GAD discriminator: its own `gad.d_micro_batch_size` already ----------------------
def test_discriminator_scores_and_update_do_not_depend_on_micro_batch_size(hf):
    """The BT step's closed-form coefficients are laid out micro-batch by micro-batch;
    1-row and 4-row micro-batches must give the same scores and the same step."""
    from megatron_rl.trainer.discriminator import Discriminator
    from tests.gad.parallel_workers import pairs_batches

    students, teachers, pair = pairs_batches()
    one, four = (make_critic(hf, micro_batch_size=m, cls=Discriminator) for m in (1, 4))
    s1, t1 = one.scores(students), one.scores(teachers)
    s4, t4 = four.scores(students), four.scores(teachers)
    assert (s1 - s4).abs().max() < 1e-5 and (t1 - t4).abs().max() < 1e-5
    m1, m4 = one.update(students, teachers, pair, s1, t1), four.update(students, teachers, pair, s4, t4)
    assert m1["critic/d_grad_norm"] == pytest.approx(m4["critic/d_grad_norm"], rel=1e-5)
    for (name, p1), p4 in zip(one.model.named_parameters(), four.model.parameters()):   # grads of the step
        assert (p1.main_grad - p4.main_grad).abs().max() <= 1e-5 * (1 + p1.main_grad.abs().max()), name
    after1, after4 = one.scores(students), four.scores(students)
    assert (after1 - s1).abs().max() > 1e-3
    # Adam's first step is ~lr * sign(grad): float noise in near-zero grads shows as ~1e-5 here
    assert (after1 - after4).abs().max() < 1e-4


def test_gad_discriminator_micro_batch_size_must_be_positive():
    from megatron_rl.config import ConfigError, load_experiment_config

    with pytest.raises(ConfigError, match=r"gad\.d_micro_batch_size must be positive"):
        load_experiment_config(None, ["gad.d_micro_batch_size=0"])
