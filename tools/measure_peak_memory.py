"""Measured peak GPU memory of a real Megatron training step, next to the planner's prediction.

One step = forward + backward over `--num-microbatches` micro-batches through Megatron's
own schedule (1F1B under PP) + Megatron DDP (fp32 main grads) + Megatron's (distributed)
Adam optimizer step; run `--steps` steps (the first one allocates the optimizer state).
Each rank reports `torch.cuda.max_memory_allocated()` and the planner's train-phase
prediction for its pipeline stage without the fixed overhead (which that counter never
sees); rank 0 prints the table and the relative error.

    torchrun --standalone --nproc-per-node 1 tools/measure_peak_memory.py --hf-config llama-1b --seq 4096
    torchrun --standalone --nproc-per-node 2 tools/measure_peak_memory.py --hf-config llama3-8b --tp 2 \
        --seq 4096 --num-microbatches 4 --recompute selective
    torchrun --standalone --nproc-per-node 2 tools/measure_peak_memory.py --tiny --tp 2   # CPU/gloo smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rl.plan import memory as mp  # noqa: E402

TINY = mp.Shape(4, 64, 4, 2, 16, 128, 96, tie_word_embeddings=False)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-config", default="llama-1b", help="preset or HF config.json / directory")
    ap.add_argument("--tiny", action="store_true", help="a 4-layer toy model (CPU smoke run)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="default: on with TP > 1 under the TE layer spec")
    ap.add_argument("--recompute", choices=mp.RECOMPUTE, default="none")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--num-microbatches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--layer-spec", default="auto")
    ap.add_argument("--loss-path", choices=("unfused", "fused"), default="fused")
    ap.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                    help="default: on GPU (Megatron's distributed optimizer needs CUDA tensors)")
    ap.add_argument("--json", default=None, help="rank 0 writes the rows here")
    return ap


def shape_and_arch(args):
    from megatron_rl.models.hf_config import ModelArch
    shape = TINY if args.tiny else mp.resolve_shape(args.hf_config)
    arch = ModelArch("llama" if not shape.qkv_bias else "qwen2", shape.num_layers, shape.hidden_size,
                     shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.ffn_hidden_size,
                     shape.vocab_size, max(args.seq, 4096), 500000.0, 1e-5, shape.tie_word_embeddings,
                     shape.qkv_bias, hf_architecture="Qwen2ForCausalLM" if shape.qkv_bias else "LlamaForCausalLM")
    return shape, arch


def build(args, arch, dtype, sp):
    """Megatron DDP model (fp32 main grads) and Megatron optimizer, as the trainer builds them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_rl.models import build_model

    model = build_model(arch, dtype=dtype, layer_spec=args.layer_spec, recompute=args.recompute,
                        sequence_parallel=sp)
    dist_opt = args.distributed_optimizer
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=dist_opt)
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    bf16 = dtype == "bfloat16"
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-5, weight_decay=0.0, bf16=bf16, params_dtype=model.config.params_dtype,
                              use_distributed_optimizer=dist_opt, clip_grad=1.0)
    opt = get_megatron_optimizer(opt_cfg, [ddp])
    return ddp, opt


def train_step(ddp, opt, microbatches, loss_path: str) -> None:
    from megatron.core import parallel_state as mpu
    from megatron_rl.kernels import token_logprob_entropy
    from megatron_rl.models.schedule import run_microbatches

    tp_group = mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 else None
    n = len(microbatches)

    def forward_fn(model, mb):
        return model(mb["input_ids"], mb["position_ids"], None)

    def loss_fn(mb, logits):
        if loss_path == "fused":
            logprob, _ = token_logprob_entropy(logits, mb["labels"], tp_group, inplace_backward=True)
        else:
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
            logprob = -vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                    mb["labels"].transpose(0, 1).contiguous())
        loss = -logprob.float().mean() / n
        return loss, {}

    ddp.zero_grad_buffer()
    opt.zero_grad()
    run_microbatches(ddp, microbatches, forward_fn, loss_fn, forward_only=False)
    opt.step()


def plan_inputs(args, shape, dtype, sp, world) -> mp.PlanInputs:
    from megatron_rl.models.layer_specs import resolve_layer_spec_name
    spec = resolve_layer_spec_name(args.layer_spec)
    return mp.PlanInputs(
        shape=shape, gpus=world, gpu_mem_gib=1e9, tp=args.tp, pp=args.pp, sequence_parallel=sp,
        sp_supported=spec == "te",
        recompute=args.recompute, dtype=dtype, grad_fp32=True,
        distributed_optimizer=args.distributed_optimizer, micro_batch=args.micro_batch,
        seq_len=args.seq, num_microbatches=args.num_microbatches, loss_path=args.loss_path,
        flash_attention=spec != "local", fused_swiglu=spec == "te" or (spec == "sdpa" and torch.cuda.is_available()),
        engine="vllm", colocate=False, overhead_gib=0.0)


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    from megatron.core import parallel_state as mpu
    import torch.distributed as dist
    from megatron_rl.parallel import destroy_distributed, init_distributed

    on_gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    from megatron_rl.models.layer_specs import resolve_layer_spec_name
    spec = resolve_layer_spec_name(args.layer_spec)       # SP needs TE's norms (Megatron's torch norms refuse it)
    sp = args.tp > 1 and (spec == "te" if args.sequence_parallel is None else args.sequence_parallel)
    if args.distributed_optimizer is None:
        args.distributed_optimizer = on_gpu
    if args.tiny:
        args.seq = min(args.seq, 32)
    init_distributed(args.tp, args.pp)
    world, rank = dist.get_world_size(), dist.get_rank()
    shape, arch = shape_and_arch(args)
    ddp, opt = build(args, arch, dtype, sp)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    g = torch.Generator().manual_seed(1234 + mpu.get_data_parallel_rank())
    mbs = []
    for _ in range(args.num_microbatches):
        ids = torch.randint(0, shape.vocab_size, (args.micro_batch, args.seq + 1), generator=g)
        mbs.append({"input_ids": ids[:, :-1].contiguous().to(device), "labels": ids[:, 1:].contiguous().to(device),
                    "position_ids": torch.arange(args.seq, device=device)[None].expand(args.micro_batch, -1)})
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    import time
    step_s = 0.0
    for _ in range(args.steps):       # the last step's time: the first one also allocates optimizer state
        t0 = time.perf_counter()
        train_step(ddp, opt, mbs, args.loss_path)
        if on_gpu:
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
    measured = torch.cuda.max_memory_allocated() / mp.GiB if on_gpu else None

    pp_rank = mpu.get_pipeline_model_parallel_rank()
    stage = "only" if args.pp == 1 else ("first" if pp_rank == 0 else "last" if pp_rank == args.pp - 1 else "middle")
    inputs = plan_inputs(args, shape, dtype, sp, world)
    plan = mp.estimate_stage(inputs, stage, pp_rank)
    predicted = plan.train_allocated / mp.GiB
    row = {"rank": rank, "tp_rank": mpu.get_tensor_model_parallel_rank(), "pp_rank": pp_rank, "stage": stage,
           "measured_gib": None if measured is None else round(measured, 3), "predicted_gib": round(predicted, 3),
           "error_pct": None if measured is None else round(100 * (predicted - measured) / measured, 1),
           "step_s": round(step_s, 3), "device": torch.cuda.get_device_name() if on_gpu else "cpu"}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print(f"model {'tiny' if args.tiny else args.hf_config}: {mp.layout(inputs)}, micro-batch {args.micro_batch} x "
              f"{args.seq}, {args.num_microbatches} micro-batches, {dtype}, loss {args.loss_path}")
        print("| rank | tp | pp | stage | measured GiB | predicted GiB | error % | step s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['rank']} | {r['tp_rank']} | {r['pp_rank']} | {r['stage']} | {r['measured_gib']} | "
                  f"{r['predicted_gib']} | {r['error_pct']} | {r['step_s']} |")
        if not on_gpu:
            print("cpu: no CUDA allocator, measured peak not available (smoke run)")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    destroy_distributed()
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
