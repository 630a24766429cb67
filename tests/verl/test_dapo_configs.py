"""The DAPO recipes resolve their plans (the step's trained sample count is fixed), and the
plan refuses DAPO options it cannot honour, by name."""
from pathlib import Path

import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import PlanError, resolve_plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_dapo_qwen3_8b_plans_on_8_gpus():
    cfg = load_experiment_config(CONFIGS / "dapo_qwen3_8b_gpu.yaml")
    plan = resolve_plan(cfg, world_size=8, device="cuda")
    s = plan.sampling
    assert (s.dynamic_sampling, s.metric, s.max_rounds, s.overlong_buffer_len) == (True, "acc", 10, 4096)
    assert s.groups_per_dp_rank == 128 and s.samples_per_dp_rank == plan.batch.samples_per_dp_rank == 2048
    assert plan.batch.optimizer_steps_per_rollout == 16 and plan.memory.fits
    assert (cfg.algos.clip_low, cfg.algos.clip_high, cfg.algos.loss_agg_mode) == (0.2, 0.28, "token-mean")


def test_dapo_quickstart_config_loads():
    cfg = load_experiment_config(CONFIGS / "dapo_quickstart_cpu.yaml")
    plan = resolve_plan(cfg, world_size=1, device="cpu")
    assert plan.sampling.dynamic_sampling and plan.batch.samples_per_step == 32
    assert cfg.reward.overlong.buffer_len == 4 and cfg.rollout.max_new_tokens == 12


@pytest.mark.parametrize("overrides,match", [
    (["reward.overlong.buffer_len=12"], "reward.overlong.buffer_len=12 must be below rollout.max_new_tokens"),
    (["rollout.n=1"], "algos.dynamic_sampling.enable needs rollout.n >= 2"),
    (["algos.dynamic_sampling.metric=seq_final_reward", "algos.use_kl_in_reward=true"], "seq_final_reward"),
])
def test_plan_refuses_what_it_cannot_honour(overrides, match):
    cfg = load_experiment_config(CONFIGS / "dapo_quickstart_cpu.yaml", overrides)
    with pytest.raises(PlanError, match=match):
        resolve_plan(cfg, world_size=1, device="cpu")
