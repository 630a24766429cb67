"""The resolved run plan: config + world layout -> one immutable `RunPlan`, checked once.

    plan = resolve_plan(cfg, world_size=64, device="cuda")
    plan.batch.optimizer_steps_per_rollout, plan.batch.lr_horizon_steps, plan.role("reference").placement
    print(plan.summary())

The trainer, the memory planner and `megatron-rl plan` read the plan instead of
re-deriving batch arithmetic; an option the plan cannot honour is refused here, by
name (`PlanError`, a `ConfigError`). Pure python: no process groups, no GPU.
Meanings of the batch keys: `megatron_rl/plan/batch.py` and docs/run_plan.md.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.plan.batch import BatchPlan, RolePlan, resolve_batch
from megatron_rl.plan.layout import (Layout, ModelPlan, PlanError, check_context_parallel_run, model_shape,
                                     resolve_layout)
from megatron_rl.plan.placement import check_placement, trainer_world
from megatron_rl.plan.passes import (OldLogprobPlan, auto_rollout_offload, check_distributed_optimizer,
                                     check_vllm_section, choose_rollout_offload, resolve_engine_logprobs, resolve_old_logprob,
                                     resolve_rollout_offload, rollout_offload_reason)
from megatron_rl.plan.roles import predictor_recipe, recipe, resolve_roles
from megatron_rl.plan.sampling import SamplingPlan, resolve_sampling
from megatron_rl.plan.vision_memory import check_freeze_vision, check_packing_with_vision, image_tokens_per_sample

FUSED_LOSS = {"auto": None, "on": "triton", "off": "torch"}   # actor.fused_loss -> kernels backend name


@dataclass(frozen=True)
class RolloutPlan:
    engine: str                 # native | vllm
    placement: str              # colocated (the engine shares the training GPUs) | disaggregated (plan/placement.py)
    samples_per_dp_rank: int
    max_new_tokens: int
    gpu_memory_utilization: float | None   # vLLM only
    offload_during_rollout: str = "none"   # none | state | state_and_weights (actor.offload_during_rollout)
    num_ranks: int = 0                     # rollout ranks (disaggregated), after the trainer ranks
    async_mode: str = "sync"               # trainer.async.mode
    max_staleness: int = 0                 # policy versions a trained sample may lag (the mode's bound)
    engine_logprobs: bool = True           # the engine returns rollout_logprob (rollout.engine_logprobs)
    engine_logprobs_reason: str = ""
    offload_reason: str = ""               # why offload_during_rollout (plan/passes.py choose_rollout_offload)


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory planner's per-GPU estimate (plan/memory.py), GiB; read-only."""
    gpu_mem_gib: float
    peak_gib: float
    peak_phase: str
    fits: bool
    stage: str
    components_gib: dict[str, float]
    phases_gib: dict[str, float]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class RunPlan:
    recipe: str                 # grpo | ppo | gad | steering_predictor
    layout: Layout
    model: ModelPlan
    batch: BatchPlan
    roles: tuple[RolePlan, ...]
    loss_backend: str | None    # None: the kernels pick (Triton on CUDA) | torch | triton
    token_weights_apply_to: str
    rollout: RolloutPlan
    old_logprob: OldLogprobPlan = OldLogprobPlan("recompute", "default")
    memory: MemoryEstimate | None = None
    notes: tuple[str, ...] = field(default=())
    sampling: SamplingPlan | None = None   # DAPO options (plan/sampling.py)

    def role(self, name: str) -> RolePlan:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"run plan has no role {name!r}; roles: {[r.name for r in self.roles]}")

    def has_role(self, name: str) -> bool:
        return any(r.name == name for r in self.roles)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write_json(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def summary(self) -> str:
        from megatron_rl.plan.summary import format_summary
        return format_summary(self)


def loss_backend(setting: str, device: str) -> str | None:
    if setting not in FUSED_LOSS:
        raise PlanError(f"actor.fused_loss must be auto|on|off, got {setting!r}")
    if setting == "on" and device != "cuda":
        raise PlanError("actor.fused_loss=on needs a CUDA GPU (Triton); use auto or off on CPU")
    return FUSED_LOSS[setting]


def resolve_rollout(cfg, layout: Layout, batch: BatchPlan, shape=None) -> RolloutPlan:
    r = cfg.rollout
    if r.engine not in ("native", "vllm"):
        raise PlanError(f"rollout.engine must be native|vllm, got {r.engine!r}")
    if r.engine == "vllm" and layout.device != "cuda":
        raise PlanError("rollout.engine=vllm needs device cuda; use rollout.engine=native on CPU")
    check_vllm_section(cfg)
    placement = check_placement(cfg, shape, recipe(cfg))
    offload = resolve_rollout_offload(cfg, layout.device)
    return RolloutPlan(engine=r.engine, samples_per_dp_rank=batch.samples_per_dp_rank, **placement,
                       max_new_tokens=r.max_new_tokens,
                       gpu_memory_utilization=r.gpu_memory_utilization if r.engine == "vllm" else None,
                       offload_during_rollout=offload,
                       offload_reason=rollout_offload_reason(cfg, offload, layout.device),
                       **resolve_engine_logprobs(cfg))


def resolve_model_spec(cfg, device: str, shape) -> tuple[str, str]:
    """(layer spec, why) for `model.layer_spec` here, and the `model.fp8` checks against it."""
    from megatron_rl.models.fp8 import fp8_enabled, fp8_problem
    from megatron_rl.models.layer_specs import choose_layer_spec
    m = cfg.model
    spec, why = choose_layer_spec(m.layer_spec, device, fp8=fp8_enabled(m) and device == "cuda", cp=m.cp,
                                  sequence_parallel=m.sequence_parallel, tp=m.tp,
                                  moe=bool(shape is not None and shape.is_moe and not getattr(shape, "is_mla", False)
                                           and m.moe.grouped_gemm is not False),
                                  grouped_gemm=m.moe.grouped_gemm is True)
    problem = fp8_problem(m, device=device, layer_spec=spec, shape=shape, engine=cfg.rollout.engine,
                          max_tokens_per_microbatch=cfg.actor.max_tokens_per_microbatch, pp=m.pp)
    if problem:
        raise PlanError(problem)
    if shape is not None and getattr(shape, "is_mla", False):      # as the model builder resolves it
        if m.layer_spec not in ("auto", "local"):
            raise PlanError(f"model.layer_spec={m.layer_spec!r} is not supported with multi-latent attention "
                            "(DeepSeek-V3): only the local spec's MLASelfAttention is tested; use local or auto")
        spec, why = "local", "multi-latent attention (DeepSeek-V3) runs on the local spec only"
    return spec, why


def _apply_to(cfg) -> str:
    if cfg.token_weights.source != "none":
        return cfg.token_weights.apply_to
    return cfg.algos.token_weights_apply_to


def _notes(cfg, layout: Layout, model: ModelPlan, batch: BatchPlan) -> list[str]:
    notes = []
    if model.shape is None:
        notes.append(f"model shape {model.shape_source}; pass --shape PRESET|config.json to check layers/heads "
                     "and estimate memory")
    if predictor_recipe(cfg):
        notes.append("steering predictor recipe: the LLM is frozen, so actor.optim, actor.mini_batch_size and "
                     "actor.ppo_epochs are unused")
    if cfg.ref.offload and layout.device == "cpu":
        notes.append("ref.offload has no effect on cpu (the reference already lives in host memory)")
    if cfg.model.sequence_parallel and cfg.model.tp == 1:
        notes.append("model.sequence_parallel is off at model.tp=1")
    if layout.device == "cuda" and model.layer_spec_choice == "te" and not cfg.actor.max_tokens_per_microbatch:
        notes.append("layer spec te with actor.max_tokens_per_microbatch=0: micro-batches with padding run TE's "
                     "unfused attention (models/te_attention.py; slower, O(s^2) memory the estimate leaves out); "
                     "a token budget packs them (no padding, fused kernels)")
    elif layout.device == "cuda" and not cfg.actor.max_tokens_per_microbatch and _packable(cfg, model):
        notes.append("padded micro-batches (actor.max_tokens_per_microbatch=0): packed ones are the faster GPU path "
                     "(H200, e2e GRPO update of a SmolLM2-1.7B shape: 2.84-2.90 s at 20480 tokens vs 3.41 s "
                     f"padded; docs/performance.md); any budget >= {batch.max_sample_tokens} tokens (the longest "
                     "sample) works")
    if batch.lr_horizon_steps and batch.lr_warmup_steps >= batch.lr_horizon_steps:
        notes.append(f"actor.optim.lr_warmup_steps={batch.lr_warmup_steps} >= the LR horizon "
                     f"({batch.lr_horizon_steps} optimizer steps): the LR never reaches actor.optim.lr")
    return notes


def _packable(cfg, model: ModelPlan) -> bool:
    """Packing is accepted here (no interleaved pipeline, steering or vision tower refuses it)."""
    vision = model.shape is not None and getattr(model.shape, "vision", None)
    return cfg.model.vpp is None and not cfg.steering.enable and not vision


def resolve_plan(cfg, *, world_size: int, device: str, shape: str | None = None,
                 gpu_mem_gib: float = 80.0, overhead_gib: float = 2.5) -> RunPlan:
    """The plan of `cfg` on `world_size` ranks of `device` ("cpu" | "cuda").

    `shape`: a memory-planner preset or an HF config.json, for a `model.path` that is not on
    this machine (default: read `model.path`, else match its name against the presets).
    The memory estimate (cuda only, known shape) assumes `gpu_mem_gib` GPUs."""
    if cfg.algos.adv_estimator == "gae" and not cfg.critic.enable:
        raise PlanError("algos.adv_estimator=gae needs values from a critic: set critic.enable=true "
                        "(or choose another algos.adv_estimator, e.g. grpo)")
    m = cfg.model
    from megatron_rl.models.routing_replay import replay_conflicts
    if (why := replay_conflicts(cfg)) is not None:
        raise PlanError(why)
    shp, source = model_shape(m.path, shape)
    layout = resolve_layout(m, trainer_world(cfg, world_size), device, shp)   # rollout ranks left out
    dist_opt = check_distributed_optimizer(cfg.actor.optim, "actor.optim", device)   # as trainer/build.py
    if cfg.critic.enable:
        check_distributed_optimizer(cfg.critic.optim, "critic.optim", device)
    check_freeze_vision(m.freeze_vision, shp)
    check_packing_with_vision(cfg.actor.max_tokens_per_microbatch, shp)
    spec, spec_reason = resolve_model_spec(cfg, device, shp)
    check_context_parallel_run(cfg, spec)
    model = ModelPlan(shape=shp, shape_source=source, dtype=m.dtype, layer_spec=m.layer_spec,
                      layer_spec_choice=spec, layer_spec_reason=spec_reason, fp8=m.fp8, fp8_recipe=m.fp8_recipe,
                      recompute=m.recompute, distributed_optimizer=bool(dist_opt), freeze_vision=m.freeze_vision,
                      image_tokens=image_tokens_per_sample(cfg.data.image, shp and shp.vision,
                                                           cfg.data.max_prompt_length))
    batch = resolve_batch(cfg, layout, actor_trainable=not predictor_recipe(cfg))
    roles = resolve_roles(cfg, layout, batch)
    plan = RunPlan(recipe=recipe(cfg), layout=layout, model=model, batch=batch, roles=roles,
                   loss_backend=loss_backend(cfg.actor.fused_loss, device), token_weights_apply_to=_apply_to(cfg),
                   rollout=resolve_rollout(cfg, layout, batch, shp),
                   old_logprob=resolve_old_logprob(cfg, batch, recipe(cfg)), notes=tuple(_notes(cfg, layout, model, batch)),
                   sampling=resolve_sampling(cfg, batch, recipe(cfg)))
    if shp is not None and device == "cuda":
        plan = resolve_auto_offload(cfg, plan, gpu_mem_gib, overhead_gib)
        plan = dataclasses.replace(plan, memory=estimate_memory(plan, gpu_mem_gib, overhead_gib))
    return plan


def resolve_auto_offload(cfg, plan: RunPlan, gpu_mem_gib: float, overhead_gib: float) -> RunPlan:
    """An unset `actor.offload_during_rollout` (colocated vLLM: `state` so far) decided on the
    estimate: `none` where the rollout phase with the training state kept fits (plan/passes.py
    `choose_rollout_offload`); runs before the final estimate, which then counts the chosen mode."""
    if not auto_rollout_offload(cfg, plan.rollout.offload_during_rollout):
        return plan
    mode, why = choose_rollout_offload(rollout_kept_gib(plan, gpu_mem_gib, overhead_gib), gpu_mem_gib)
    return dataclasses.replace(plan, rollout=dataclasses.replace(plan.rollout, offload_during_rollout=mode,
                                                                 offload_reason=why))


def rollout_kept_gib(plan: RunPlan, gpu_mem_gib: float = 80.0, overhead_gib: float = 2.5) -> float:
    """The rollout phase with the actor's grads and optimizer state kept on the GPU, on the worst
    pipeline stage (weights + grads + optimizer + critic + resident reference + engine + overhead), GiB."""
    from megatron_rl.plan import memory as mp
    est = mp.estimate(mp.inputs_from_plan(plan, gpu_mem_gib=gpu_mem_gib, overhead_gib=overhead_gib,
                                          rollout_offload="none"))
    return max(ph["rollout"] for ph in (est.phases, *est.other_stages.values())) / mp.GiB


def estimate_memory(plan: RunPlan, gpu_mem_gib: float = 80.0, overhead_gib: float = 2.5) -> MemoryEstimate:
    from megatron_rl.plan import memory as mp
    est = mp.estimate(mp.inputs_from_plan(plan, gpu_mem_gib=gpu_mem_gib, overhead_gib=overhead_gib))
    return MemoryEstimate(gpu_mem_gib=gpu_mem_gib, peak_gib=est.peak / mp.GiB, peak_phase=est.peak_phase,
                          fits=est.fits, stage=est.stage,
                          components_gib={k: v / mp.GiB for k, v in est.components.items()},
                          phases_gib={k: v / mp.GiB for k, v in est.phases.items()}, notes=tuple(est.notes))
