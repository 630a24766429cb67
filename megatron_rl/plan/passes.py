"""Which optional passes and memory moves a GRPO/PPO step makes, decided once from the config.

- Old log-probs (`actor.recompute_old_logprob`): an exactly on-policy update (one optimizer
  step per rollout, `rollout.logprob_mode: recompute`) would recompute, in a separate
  forward, the very log-probs its own forward yields; with old = current detached the
  PPO ratio is exactly 1 and the gradient the same, so `auto` skips that pass (verl and
  TRL do the same). The pass stays where something reads `old_logprob` before the
  update (KL-in-reward, steering's recompute / IS weights, token-weight sources, GAD) or
  where the update takes several optimizer steps (the policy moves between them), and always
  under `algos.off_policy.correction` (old against rollout log-probs; refused with
  `rollout.logprob_mode: rollout`, which has no separate old log-probs).
- Training state during rollout (`actor.offload_during_rollout`): a colocated vLLM engine
  needs the GPU while it generates; the actor's grad buffers and optimizer state (and, by
  option, its weights) move to host memory for the rollout (models/offload.py). Unset, the
  plan keeps them on the GPU when the rollout phase with them kept fits (`choose_rollout_offload`):
  the offload cost 1.05 s per step on issue 20's workload (9.11 vs 8.06 s, docs/BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.plan.batch import BatchPlan
from megatron_rl.plan.layout import PlanError

OFFLOAD_MODES = ("none", "state", "state_and_weights")


@dataclass(frozen=True)
class OldLogprobPlan:
    source: str         # recompute (a separate actor pass) | rollout (the engine's) | update_forward (skipped pass)
    reason: str

    @property
    def separate_pass(self) -> bool:
        return self.source == "recompute"


def resolve_old_logprob(cfg, batch: BatchPlan, recipe: str) -> OldLogprobPlan:
    mode = cfg.actor.recompute_old_logprob
    if mode not in ("auto", "always"):
        raise PlanError(f"actor.recompute_old_logprob must be auto|always, got {mode!r}")
    off = cfg.algos.off_policy
    if off.enabled:
        return _off_policy_old_logprob(cfg, off.correction)
    if cfg.rollout.logprob_mode == "rollout":
        return OldLogprobPlan("rollout", "rollout.logprob_mode=rollout: the engine's log-probs")
    if mode == "always":
        return OldLogprobPlan("recompute", "actor.recompute_old_logprob=always")
    keep = []
    if recipe not in ("grpo", "ppo"):
        keep.append(f"the {recipe} recipe")
    if batch.optimizer_steps_per_rollout != 1:
        keep.append(f"{batch.optimizer_steps_per_rollout} optimizer steps per rollout "
                    f"({batch.mini_batches_per_epoch} mini-batches x {batch.ppo_epochs} epochs)")
    if cfg.algos.use_kl_in_reward:
        keep.append("algos.use_kl_in_reward (the KL penalty needs old log-probs before the advantages)")
    if cfg.steering.enable:
        keep.append("steering.enable (steered recompute / rollout IS weights)")
    if cfg.token_weights.source != "none":
        keep.append(f"token_weights.source={cfg.token_weights.source}")
    if keep:
        return OldLogprobPlan("recompute", "separate pass: " + "; ".join(keep))
    return OldLogprobPlan("update_forward", "on-policy (1 optimizer step per rollout): the update's own forward, "
                                            "detached; no rollout/logprob_diff "
                                            "(actor.recompute_old_logprob=always keeps it)")


def engine_logprob_readers(cfg) -> list[str]:
    """What reads the engine's `rollout_logprob` before or in the update."""
    readers = []
    if cfg.rollout.logprob_mode == "rollout":
        readers.append("rollout.logprob_mode=rollout")
    if cfg.steering.enable and getattr(cfg.steering, "logprob_mode", "") == "rollout_is":
        readers.append("steering.logprob_mode=rollout_is")
    if cfg.algos.off_policy.enabled:
        readers.append(f"algos.off_policy.correction={cfg.algos.off_policy.correction}")
    return readers


def resolve_engine_logprobs(cfg) -> dict:
    """`rollout.engine_logprobs` -> whether the engine returns per-token log-probs, and why."""
    mode = cfg.rollout.engine_logprobs
    if mode not in ("auto", "always", "never"):
        raise PlanError(f"rollout.engine_logprobs must be auto|always|never, got {mode!r}")
    readers = engine_logprob_readers(cfg)
    if mode == "never" and readers:
        raise PlanError(f"rollout.engine_logprobs=never, but {', '.join(readers)} reads the engine's log-probs; "
                        "use auto")
    if mode == "always":
        return {"engine_logprobs": True, "engine_logprobs_reason": "rollout.engine_logprobs=always "
                                                                   "(rollout/logprob_diff is logged)"}
    if readers:
        return {"engine_logprobs": True, "engine_logprobs_reason": "read by " + ", ".join(readers)}
    return {"engine_logprobs": False, "engine_logprobs_reason": f"rollout.engine_logprobs={mode}: nothing reads them "
                                                                "(no rollout/logprob_diff; `always` logs it)"}


def _off_policy_old_logprob(cfg, correction: str) -> OldLogprobPlan:
    """An off-policy correction compares the trainer's old log-probs with the engine's
    `rollout_logprob` (which `resolve_engine_logprobs` asks the engine for, the correction being
    one of their readers): both must exist, so the pass is forced."""
    key = f"algos.off_policy.correction={correction}"
    if cfg.rollout.logprob_mode == "rollout":
        raise PlanError(f"{key} with rollout.logprob_mode=rollout: the correction weighs the trainer's old "
                        "log-probs against the rollout's, and that mode uses the rollout's as the old ones "
                        "(every ratio would be 1); set rollout.logprob_mode=recompute or correction=none")
    if cfg.steering.enable and cfg.steering.logprob_mode == "rollout_is":
        raise PlanError(f"{key} with steering.logprob_mode=rollout_is: both fold the same ratio "
                        "exp(old - rollout) into token_weights (it would be applied twice); keep one")
    return OldLogprobPlan("recompute", f"separate pass: {key} (old log-probs against the rollout's)")


# Free GPU memory the unset `actor.offload_during_rollout` leaves when it keeps the training state
# on the GPU: the estimate's rollout phase (weights + grads + optimizer + vLLM's pool + overhead) is
# within 1-2 GiB of the measured peak (issue 20 workload: 89.9 estimated vs 91.6 GiB measured), but
# allocator fragmentation and vLLM's CUDA graphs vary by run; 10% of the GPU covers both.
OFFLOAD_FIT_MARGIN = 0.10


def resolve_rollout_offload(cfg, device: str) -> str:
    """`actor.offload_during_rollout`, defaulted and checked against the engine. Unset with a
    colocated vLLM engine: `state` here; `choose_rollout_offload` revisits that once the plan
    can estimate memory (cuda, known shape)."""
    r = cfg.rollout
    mode = cfg.actor.offload_during_rollout
    frozen_actor = cfg.steering.enable and cfg.steering.predictor.enable     # the predictor recipe
    if mode is None:
        return "state" if (r.engine == "vllm" and r.colocate and not frozen_actor) else "none"
    if mode not in OFFLOAD_MODES:
        raise PlanError(f"actor.offload_during_rollout must be one of {'|'.join(OFFLOAD_MODES)}, got {mode!r}")
    if mode != "none" and frozen_actor:
        raise PlanError(f"actor.offload_during_rollout={mode} with steering.predictor.enable: the LLM is frozen "
                        "(no gradients or optimizer state to move); use none")
    if mode == "state_and_weights" and r.engine == "native":
        raise PlanError("actor.offload_during_rollout=state_and_weights with rollout.engine=native: the native "
                        "engine generates with the actor's own weights; use state or none")
    return mode


def auto_rollout_offload(cfg, mode: str) -> bool:
    """Whether `mode` is the unset setting's `state` default, which the memory estimate may relax."""
    return cfg.actor.offload_during_rollout is None and mode == "state"


def choose_rollout_offload(kept_gib: float, gpu_mem_gib: float) -> tuple[str, str]:
    """(mode, why) for an unset `actor.offload_during_rollout` with colocated vLLM: `none` when the
    rollout phase with the training state kept (`kept_gib`, worst pipeline stage) fits the GPU
    less `OFFLOAD_FIT_MARGIN`, else `state`.

    Issue 20's e2e workload (SmolLM2-1.7B shape, DP=1, one 139.7 GiB H200, gpu_memory_utilization
    0.42): 28.7 GiB weights + grads + optimizer + 58.7 GiB vLLM pool + 2.5 GiB overhead = 89.9 GiB
    estimated (91.6 GiB measured peak with `none`) of 125.7 GiB -> none (8.06 vs 9.11 s per step)."""
    budget = gpu_mem_gib * (1 - OFFLOAD_FIT_MARGIN)
    if kept_gib <= budget:
        return "none", (f"fits: {kept_gib:.1f} of {budget:.1f} GiB = {gpu_mem_gib:g} GiB less a "
                        f"{OFFLOAD_FIT_MARGIN:.0%} margin, with the state kept")
    return "state", (f"kept: {kept_gib:.1f} > {budget:.1f} GiB = {gpu_mem_gib:g} GiB less a "
                     f"{OFFLOAD_FIT_MARGIN:.0%} margin")


def rollout_offload_reason(cfg, mode: str, device: str) -> str:
    """Why `mode` was chosen, where no memory estimate decided it (the summary's line)."""
    if cfg.actor.offload_during_rollout is not None:
        return f"actor.offload_during_rollout={mode}"
    if mode == "state":
        why = "device cpu" if device != "cuda" else "model shape unknown"
        return f"colocated vLLM; memory not estimated ({why})"
    if cfg.steering.enable and cfg.steering.predictor.enable:
        return "the LLM is frozen (steering predictor)"
    return "no colocated vLLM engine"


def check_vllm_section(cfg) -> None:
    """`rollout.vllm.*` is read by the vLLM engine only: set under another engine it would act on
    nothing, so it is refused by name."""
    import dataclasses

    from megatron_rl.rollout.vllm_config import VLLMConfig

    v, default = cfg.rollout.vllm, VLLMConfig()
    if isinstance(v, dict):
        v = VLLMConfig(**v)
    if cfg.rollout.engine == "vllm":
        if v.release_torch_cache != default.release_torch_cache and not (cfg.rollout.colocate and v.sleep_level):
            raise PlanError(f"rollout.vllm.release_torch_cache={v.release_torch_cache!r} acts before a colocated "
                            f"engine wakes from sleep; with rollout.colocate={cfg.rollout.colocate} and "
                            f"rollout.vllm.sleep_level={v.sleep_level} it never does: leave it unset")
        return
    changed = [f.name for f in dataclasses.fields(VLLMConfig) if getattr(v, f.name) != getattr(default, f.name)]
    if changed:
        raise PlanError(f"rollout.vllm.{', rollout.vllm.'.join(changed)} set with rollout.engine={cfg.rollout.engine}: "
                        "only the vLLM engine reads them; set rollout.engine=vllm or leave them unset")


def check_distributed_optimizer(optim, key: str, device: str) -> bool:
    """`<key>.distributed_optimizer` resolved (None: on for GPU, off on CPU); refused on CPU."""
    on = optim.distributed_optimizer
    if on is None:
        return device == "cuda"
    if on and device != "cuda":
        raise PlanError(f"{key}.distributed_optimizer=true on cpu: Megatron-Core's DistributedOptimizer accepts "
                        "only torch.cuda parameters (megatron/core/optimizer/distrib_optimizer.py raises a TypeError "
                        f"for CPU tensors); set {key}.distributed_optimizer=false or leave it null (off on CPU)")
    return bool(on)
