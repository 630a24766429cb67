"""`RunPlan.summary()`: the plan as a readable table (what `megatron-rl plan` prints)."""
from __future__ import annotations


def _layout_line(plan) -> str:
    lay = plan.layout
    vpp = f" VPP={lay.vpp}" if lay.vpp else ""
    sp = " SP" if lay.sequence_parallel else ""
    return (f"{lay.world_size} x {lay.device}: TP={lay.tp} PP={lay.pp}{vpp} CP={lay.cp} EP={lay.ep} "
            f"DP={lay.dp}{sp}")


def format_summary(plan) -> str:
    b, m = plan.batch, plan.model
    micro = (f"packed, <= {b.max_tokens_per_microbatch} tokens" if b.max_tokens_per_microbatch
             else f"{b.micro_batch_size} rows per forward")
    backend = plan.loss_backend or "kernels pick (triton on CUDA, else torch)"
    rows = [
        ("recipe", plan.recipe),
        ("layout", _layout_line(plan)),
        ("model", f"{m.dtype}, layer_spec {m.layer_spec}, recompute {m.recompute}, "
                  f"distributed optimizer {'on' if m.distributed_optimizer else 'off'}"),
        ("layer spec", f"{m.layer_spec_choice or m.layer_spec} ({m.layer_spec_reason or 'set by model.layer_spec'})"),
        ("fp8", "off" if m.fp8 == "none" else f"{m.fp8}, {m.fp8_recipe} recipe (trained roles; TE spec)"),
        ("model shape", m.shape_source),
        ("prompts per step", f"{b.prompts_per_step} ({b.prompts_per_dp_rank} per DP rank)"),
        ("samples per step", f"{b.samples_per_step} ({b.samples_per_dp_rank} per DP rank), "
                             f"<= {b.max_sample_tokens} tokens each"),
        ("mini-batch", f"{b.mini_batch_samples} samples ({b.mini_batch_samples_per_rank} per DP rank), "
                       f"{b.mini_batches_per_epoch} per epoch x {b.ppo_epochs} epochs"),
        ("micro-batch", f"{micro}; {b.microbatches_per_mini_batch} per mini-batch per rank"),
        ("optimizer steps/rollout", str(b.optimizer_steps_per_rollout)),
        ("LR horizon", f"{b.lr_horizon_steps} optimizer steps over {b.rollout_steps} rollout steps "
                       f"(warm-up {b.lr_warmup_steps})"),
        ("loss backend", backend),
        ("token weights apply to", plan.token_weights_apply_to),
        ("rollout", f"{plan.rollout.engine}, {plan.rollout.placement}"
                    + (f" on {plan.rollout.num_ranks} rollout rank(s), async {plan.rollout.async_mode} (max "
                       f"staleness {plan.rollout.max_staleness})" if plan.rollout.num_ranks else "")
                    + (f", gpu_memory_utilization {plan.rollout.gpu_memory_utilization}"
                       if plan.rollout.gpu_memory_utilization is not None else "")
                    + f"; training state during rollout: offload {plan.rollout.offload_during_rollout}"
                    + (f" ({plan.rollout.offload_reason})" if plan.rollout.offload_reason else "")),
        ("old log-probs", f"{plan.old_logprob.source} ({plan.old_logprob.reason})"),
        ("engine log-probs", f"{'yes' if plan.rollout.engine_logprobs else 'no'} "
                             f"({plan.rollout.engine_logprobs_reason})"),
    ]
    if plan.sampling is not None:
        from megatron_rl.plan.sampling import sampling_line
        rows.append(("sampling", sampling_line(plan.sampling)))
    width = max(len(k) for k, _ in rows)
    lines = ["run plan", "--------"] + [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "| role          | trainable | placement    | micro | mini (per rank) | opt steps/rollout | LR horizon |",
              "|---------------|-----------|--------------|-------|-----------------|-------------------|------------|"]
    for r in plan.roles:
        mini = f"{r.mini_batch_samples} ({r.mini_batch_samples_per_rank})" if r.trainable else "-"
        lines.append(f"| {r.name:<13} | {'yes' if r.trainable else 'no':<9} | {r.placement:<12} | "
                     f"{r.micro_batch_size:>5} | {mini:>15} | {r.optimizer_steps_per_rollout:>17} | "
                     f"{r.lr_horizon_steps:>10} |")
    lines.append("")
    mem = plan.memory
    if mem is None:
        why = "device cpu" if plan.layout.device == "cpu" else "model shape unknown"
        lines.append(f"per-GPU memory: not estimated ({why})")
    else:
        verdict = "fits" if mem.fits else "DOES NOT FIT"
        lines.append(f"per-GPU memory: peak {mem.peak_gib:.1f} GiB of {mem.gpu_mem_gib:g} GiB in phase "
                     f"'{mem.peak_phase}' (pipeline stage '{mem.stage}'): {verdict}")
        lines.append("  phases: " + ", ".join(f"{k} {v:.1f}" for k, v in mem.phases_gib.items()) + " GiB")
        lines.append("  " + ", ".join(f"{k} {v:.1f}" for k, v in mem.components_gib.items() if v) + " GiB")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
