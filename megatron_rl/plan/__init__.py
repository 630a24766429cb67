"""The resolved run plan (`resolve_plan` -> `RunPlan`) and the per-GPU memory planner (`memory`).

Pure python on the config: importable without GPUs or process groups (docs/run_plan.md).
"""
from megatron_rl.plan.batch import BatchPlan, RolePlan
from megatron_rl.plan.layout import Layout, ModelPlan, PlanError
from megatron_rl.plan.run_plan import MemoryEstimate, RolloutPlan, RunPlan, resolve_plan

__all__ = ["BatchPlan", "Layout", "MemoryEstimate", "ModelPlan", "PlanError", "RolePlan", "RolloutPlan",
           "RunPlan", "resolve_plan"]
