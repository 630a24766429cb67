"""`megatron-rl` command line: train, plan, convert, plot, serve-retriever, check-logits."""
from __future__ import annotations

import argparse
import sys

COMMANDS = {}


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return deco


@command("train", "run RL training: megatron-rl train --config FILE [section.key=value ...]")
def _train(sub):
    sub.add_argument("--config", required=True)
    sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.optim.lr=1e-6")

    def run(args):
        from megatron_rl.trainer.main import train_main
        return train_main(args.config, args.overrides)
    return run


@command("plan", "print the resolved run plan (batches, optimizer steps, LR horizon, roles, per-GPU memory); "
                 "no GPU needed: megatron-rl plan --config FILE [--world-size N] [section.key=value ...]")
def _plan(sub):
    sub.add_argument("--config", required=True)
    sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.pp=2")
    sub.add_argument("--world-size", type=int, default=1, help="ranks of the training job (GPUs)")
    sub.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="what the ranks run on")
    sub.add_argument("--shape", default=None,
                     help="model shape when model.path is not on this machine: a preset (llama3-70b, qwen2-72b, "
                          "llama3-8b, llama-1b, smollm2-135m) or an HF config.json")
    sub.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU for the memory estimate")
    sub.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")

    def run(args):
        from megatron_rl.config import load_experiment_config
        from megatron_rl.plan import resolve_plan
        cfg = load_experiment_config(args.config, args.overrides)
        plan = resolve_plan(cfg, world_size=args.world_size, device=args.device, shape=args.shape,
                            gpu_mem_gib=args.gpu_mem)
        print(plan.summary())
        if args.json:
            plan.write_json(args.json)
        return 0
    return run


@command("import-config", "translate a verl PPO/GRPO config (+ its launch overrides) into ours: "
                          "megatron-rl import-config --from verl FILE.yaml [key=value ...] --out OUT.yaml")
def _import_config(sub):
    sub.add_argument("--from", dest="source", choices=("verl",), required=True, help="the other framework")
    sub.add_argument("file", help="its config YAML")
    sub.add_argument("overrides", nargs="*", help="its dotted launch overrides, e.g. actor_rollout_ref.rollout.n=8")
    sub.add_argument("--out", required=True, help="our YAML to write")

    def run(args):
        from megatron_rl.config.verl_import import import_config
        t = import_config(args.file, args.overrides, args.out)
        print(f"wrote {args.out}")
        if t.notes or t.untranslated:
            print(t.report())
        return 0
    return run


@command("convert", "convert checkpoints: hf-to-mcore | mcore-to-hf")
def _convert(sub):
    conv = sub.add_subparsers(dest="direction", required=True)
    a = conv.add_parser("hf-to-mcore", help="HF safetensors dir -> Megatron distributed checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1, help="expert parallel ranks (MoE checkpoints: experts split over them)")
    a.add_argument("--etp", type=int, default=None, help="expert tensor parallel ranks (default: --tp)")
    a.add_argument("--dtype", default="float32")
    b = conv.add_parser("mcore-to-hf", help="Megatron distributed checkpoint -> HF safetensors dir")
    b.add_argument("--mcore-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default=None)

    def run(args):
        from checkpoints_conversion.convert import main_hf_to_mcore, main_mcore_to_hf
        return (main_hf_to_mcore if args.direction == "hf-to-mcore" else main_mcore_to_hf)(args)
    return run


@command("plot", "write a PNG of the reward and KL curves of a run: megatron-rl plot RUN_DIR")
def _plot(sub):
    sub.add_argument("run_dir")
    sub.add_argument("--out", default=None)

    def run(args):
        from megatron_rl.logging import plot_run
        print(plot_run(args.run_dir, args.out))
    return run


@command("serve-retriever", "start the BM25 retriever server for search agents")
def _serve(sub):
    from megatron_rl.agent.retriever_server import add_arguments, serve

    add_arguments(sub)
    return serve


@command("serve", "serve a checkpoint behind an OpenAI-compatible API (native engine, loopback by default)")
def _serve_model(sub):
    sub.add_argument("--model", required=True, help="HF directory or megatron-rl checkpoint")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--host", default="127.0.0.1", help="listen address (default loopback: no authentication)")
    sub.add_argument("--dtype", default="float32")

    def run(args):
        from megatron_rl.serve.app import serve
        serve(args.model, host=args.host, port=args.port, dtype=args.dtype)
        return 0
    return run


@command("check-logits", "compare Megatron and HF transformers logits of a checkpoint")
def _check(sub):
    sub.add_argument("--model", required=True, help="HF directory")
    sub.add_argument("--tol", type=float, default=1e-3)
    sub.add_argument("--tp", type=int, default=1, help="tensor-parallel size (TP > 1: that many gloo processes)")

    def run(args):
        from megatron_rl.models.parity import main as parity_main
        return parity_main(args.model, args.tol, tp=args.tp)
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-rl", description="RL post-training on Megatron-Core")
    subs = p.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (fn, help_) in COMMANDS.items():
        runners[name] = fn(subs.add_parser(name, help=help_, description=help_))
    p.set_defaults(_runners=runners)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_rl.config import ConfigError
    try:
        rc = args._runners[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
