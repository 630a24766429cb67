"""Where the rollout engine lives (`rollout.placement`, `rollout.num_ranks`) and how generation
overlaps training (`trainer.async`), checked once at plan time.

Disaggregated placement splits the torchrun world: the last `rollout.num_ranks` ranks run the
engine (its TP = num_ranks), the rest train; the layout (TP x PP x DP) counts trainer ranks only.
"""
from __future__ import annotations

from megatron_rl.plan.layout import PlanError

PLACEMENTS = ("colocated", "disaggregated")


def trainer_world(cfg, world_size: int) -> int:
    """The ranks that train: all of them when colocated, else the world minus `rollout.num_ranks`."""
    r = cfg.rollout
    if r.placement not in PLACEMENTS:
        raise PlanError(f"rollout.placement must be one of {'|'.join(PLACEMENTS)}, got {r.placement!r}")
    if r.placement == "colocated":
        if r.num_ranks:
            raise PlanError(f"rollout.num_ranks={r.num_ranks} needs rollout.placement: disaggregated (colocated "
                            "engines run on the trainer ranks); set it to 0")
        return world_size
    if r.num_ranks < 1:
        raise PlanError(f"rollout.placement=disaggregated needs rollout.num_ranks >= 1 rollout ranks, got "
                        f"{r.num_ranks}")
    if world_size - r.num_ranks < 1:
        raise PlanError(f"rollout.num_ranks={r.num_ranks} leaves no trainer rank in a world of {world_size}: "
                        f"launch at least {r.num_ranks + 1} processes, or lower rollout.num_ranks")
    return world_size - r.num_ranks


def check_placement(cfg, shape, recipe: str) -> dict:
    """The RolloutPlan fields of placement and async mode; refusals name the key."""
    r, a = cfg.rollout, cfg.trainer.async_
    if not r.colocate:
        raise PlanError("rollout.colocate=false: set rollout.placement: disaggregated (and rollout.num_ranks) "
                        "to run the engine on its own ranks")
    if r.placement == "colocated":
        if a.mode != "sync":
            raise PlanError(f"trainer.async.mode={a.mode} needs rollout.placement: disaggregated: a colocated "
                            "engine shares the trainer's ranks, so generation cannot overlap the update")
        if a.partial_rollout or a.request_prompts:
            key = "partial_rollout" if a.partial_rollout else "request_prompts"
            raise PlanError(f"trainer.async.{key} needs rollout.placement: disaggregated")
        return {"placement": "colocated", "num_ranks": 0, "async_mode": "sync", "max_staleness": 0}
    if recipe not in ("grpo", "ppo"):
        raise PlanError(f"rollout.placement=disaggregated is implemented for the grpo/ppo recipe, not {recipe!r}")
    if r.engine != "native":
        raise PlanError(f"rollout.placement=disaggregated with rollout.engine={r.engine}: only the native engine "
                        "runs on rollout ranks so far (vLLM on its own GPUs belongs to the multi-GPU issue)")
    if cfg.agent.enable or cfg.steering.enable:
        key = "agent.enable" if cfg.agent.enable else "steering.enable"
        raise PlanError(f"{key} with rollout.placement=disaggregated: the tool loop / steering hooks are not "
                        "built on rollout ranks yet; use rollout.placement: colocated")
    if cfg.actor.offload_during_rollout not in (None, "none"):
        raise PlanError("actor.offload_during_rollout frees trainer memory for a colocated engine; with "
                        "rollout.placement=disaggregated the engine has its own ranks: set it to none")
    if a.partial_rollout and a.mode != "fully_async":
        raise PlanError(f"trainer.async.partial_rollout=true needs trainer.async.mode=fully_async: mode={a.mode} "
                        "pushes weights between engine calls by design (its policy versions are exact)")
    if a.mode != "fully_async" and a.request_prompts:
        raise PlanError(f"trainer.async.request_prompts={a.request_prompts} streams groups into the fully_async "
                        f"buffer; trainer.async.mode={a.mode} takes whole batches (set it to 0)")
    if shape is not None:
        for what, n in (("num_heads", shape.num_heads), ("num_kv_heads", shape.num_kv_heads)):
            if n % r.num_ranks:
                raise PlanError(f"rollout.num_ranks={r.num_ranks} is the engine's TP: {what}={n} is not "
                                "divisible by it")
    return {"placement": "disaggregated", "num_ranks": r.num_ranks, "async_mode": a.mode, "max_staleness": a.lag}
