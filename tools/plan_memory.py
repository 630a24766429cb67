"""Will this config fit? Per-GPU memory of an RL run, and TP/PP/recompute layouts that would fit.

    python tools/plan_memory.py --config configs/llama3_70b_grpo.yaml --gpus 64 --hf-config llama3-70b
    python tools/plan_memory.py --config configs/qwen2_72b_grpo.yaml --gpus 64 --hf-config qwen2-72b \
        model.pp=2 actor.micro_batch_size=2          # dotted overrides as for `megatron-rl train`

`--hf-config` takes a preset (llama3-70b, qwen2-72b, llama3-8b, llama-1b, smollm2-135m) or
an HF config.json / model directory; without it, `model.path` is read (or its name matched
against the presets). The batch and layout facts come from the run plan
(`megatron_rl/plan/run_plan.py`, also printed by `megatron-rl plan`); the arithmetic and
its sources are in `megatron_rl/plan/memory.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rl.plan import memory as mp  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.tp=4")
    ap.add_argument("--gpus", type=int, default=8, help="total GPUs of the training job")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="bounds TP in suggestions")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (H100 80, H200 141)")
    ap.add_argument("--hf-config", default=None, help="preset name or HF config.json / directory")
    ap.add_argument("--overhead-gb", type=float, default=2.5, help="CUDA context + fragmentation, GiB")
    ap.add_argument("--no-suggest", action="store_true", help="only the plan of the config as given")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return ap


def plan_from_args(args) -> tuple[mp.MemoryPlan, mp.PlanInputs]:
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import resolve_plan
    cfg = load_experiment_config(args.config, args.overrides)
    plan = resolve_plan(cfg, world_size=args.gpus, device="cuda", shape=args.hf_config, gpu_mem_gib=args.gpu_mem,
                        overhead_gib=args.overhead_gb)
    if plan.model.shape is None:
        raise ValueError(f"model shape {plan.model.shape_source}; pass --hf-config PRESET|config.json")
    inputs = mp.inputs_from_plan(plan, gpu_mem_gib=args.gpu_mem, overhead_gib=args.overhead_gb)
    return mp.estimate(inputs), inputs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rl.config import ConfigError
    try:
        plan, inputs = plan_from_args(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"plan_memory: {e}", file=sys.stderr)
        return 2
    suggestions = [] if args.no_suggest else mp.suggest(inputs, gpus_per_node=args.gpus_per_node)
    if args.json:
        print(json.dumps({
            "layout": mp.layout(inputs), "fits": plan.fits, "peak_gib": plan.peak / mp.GiB,
            "peak_phase": plan.peak_phase, "stage": plan.stage,
            "components_gib": {k: v / mp.GiB for k, v in plan.components.items()},
            "phases_gib": {k: v / mp.GiB for k, v in plan.phases.items()},
            "suggestions": [{"layout": mp.layout(s.inputs), "peak_gib": s.peak / mp.GiB} for s in suggestions],
        }, indent=1))
        return 0 if plan.fits else 1
    print(mp.format_plan(plan))
    if not args.no_suggest:
        print("\nsmallest layouts that fit (cheapest first):" if suggestions else
              f"\nno layout over TP in 1,2,4,8 and PP | layers fits {args.gpus} GPUs x {args.gpu_mem:g} GiB")
        for s in suggestions:
            print(f"  {mp.layout(s.inputs):<48} peak {s.peak / mp.GiB:6.2f} GiB ({s.peak_phase})")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
