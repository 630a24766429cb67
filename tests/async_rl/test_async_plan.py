"""The run plan of a disaggregated placement: the layout counts trainer ranks only, and what
it cannot honour is refused by the key's name (no processes, no model)."""
import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import PlanError, resolve_plan


def plan(*overrides, world_size=2, shape="smollm2-135m"):
    cfg = load_experiment_config(None, ["model.path=/nonexistent/SmolLM2-135M", *overrides])
    return resolve_plan(cfg, world_size=world_size, device="cpu", shape=shape)


DIS = ["rollout.placement=disaggregated", "rollout.num_ranks=1"]


def test_layout_counts_trainer_ranks_only():
    p = plan(*DIS, "trainer.async.mode=fully_async", "trainer.async.max_staleness=2", world_size=3)
    assert (p.layout.world_size, p.layout.dp) == (2, 2)
    assert (p.rollout.placement, p.rollout.num_ranks, p.rollout.async_mode, p.rollout.max_staleness) == \
        ("disaggregated", 1, "fully_async", 2)
    assert plan(*DIS, "trainer.async.mode=one_step_off").rollout.max_staleness == 1
    assert plan(*DIS, "trainer.async.mode=fully_async", "trainer.async.partial_rollout=true").rollout.async_mode \
        == "fully_async"


@pytest.mark.parametrize("world,overrides,match", [
    (1, DIS, r"rollout.num_ranks=1 leaves no trainer rank in a world of 1"),
    (2, ["rollout.placement=disaggregated"], r"needs rollout.num_ranks >= 1"),
    (2, ["rollout.num_ranks=1"], r"rollout.num_ranks=1 needs rollout.placement: disaggregated"),
    (1, ["trainer.async.mode=one_step_off"], r"trainer.async.mode=one_step_off needs rollout.placement"),
    (2, DIS + ["trainer.async.partial_rollout=true"], r"trainer.async.partial_rollout=true needs "
                                                       r"trainer.async.mode=fully_async: mode=sync"),
    (3, ["rollout.placement=disaggregated", "rollout.num_ranks=2"], r"rollout.num_ranks=2 is the engine's TP: "
                                                                    r"num_heads=9"),
    (3, DIS + ["model.tp=3"], r"world size 2 is not divisible by model.tp"),   # 3 ranks, 1 of them rollout
    (2, DIS + ["rollout.engine=vllm"], r"rollout.engine=vllm needs device cuda"),
    (2, DIS + ["trainer.async.request_prompts=2"], r"trainer.async.request_prompts=2 streams groups"),
])
def test_refusals_name_the_key(world, overrides, match):
    with pytest.raises(PlanError, match=match):
        plan(*overrides, world_size=world)


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ValueError, match=r"trainer.async.mode must be one of sync\|one_step_off\|fully_async"):
        plan(*DIS, "trainer.async.mode=async")
