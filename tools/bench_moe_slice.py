"""A Qwen3-30B-A3B-shaped slice on one GPU: its width (hidden 2048, 32 heads, 4 KV heads,
head_dim 128), 128 experts with top-8 routing (moe_intermediate 768, norm_topk_prob) and
vocab 151936, but 4 layers; random weights written by transformers, loaded into Megatron-Core
(`--layer-spec sdpa`: SequentialMLP experts; `--layer-spec te`: Transformer Engine with
TEGroupedMLP experts with `--grouped-gemm` auto or true, SequentialMLP with false; alltoall dispatcher, fp32 router),
bf16. Times one PPO update (Policy.update: forward + backward + Adam) on 8 x 2048 tokens and
the log-prob pass, prints TFLOP/s counted on the active parameters (6 x active x tokens for the
update) and the update's measured peak next to the memory planner's train-phase prediction.

    python3 tools/bench_moe_slice.py [--layers 4] [--rows 8] [--seq 2048] [--layer-spec sdpa|te]
        [--grouped-gemm auto|true|false] [--iters 4] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

A3B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
           moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
           vocab_size=151936, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
           tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])


def make(out: Path, layers: int) -> Path:
    import transformers

    if (out / "config.json").exists():
        return out
    cfg = transformers.Qwen3MoeConfig(**A3B, num_hidden_layers=layers, architectures=["Qwen3MoeForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # random init on the GPU: seconds, not minutes
        model = transformers.Qwen3MoeForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return out


def planned_train_gib(path: Path, layer_spec: str, rows: int, seq: int) -> tuple[float, float]:
    """The planner's train-phase peak (no fixed overhead) for exactly this run: the slice's
    config.json, 1 GPU, micro-batch 1 x `seq`, `rows` micro-batches in one optimizer step (PP=1:
    one in flight), bf16 with fp32 grads, distributed optimizer, fused loss; flash attention and
    fused swiglu as `plan/memory.py` sets them for a non-local spec (`megatron-rl plan`'s mapping)."""
    from megatron_rl.plan import memory as mp

    inputs = mp.PlanInputs(shape=mp.resolve_shape(str(path)), gpus=1, gpu_mem_gib=1e9, sp_supported=layer_spec == "te",
                           dtype="bfloat16", grad_fp32=True, distributed_optimizer=True, micro_batch=1, seq_len=seq,
                           num_microbatches=rows, loss_path="fused", flash_attention=layer_spec != "local",
                           fused_swiglu=layer_spec != "local", engine="native", colocate=False, overhead_gib=0.0)
    plan = mp.estimate_stage(inputs, "only")
    resident = sum(plan.components[k] for k in ("actor weights", "actor grads", "optimizer"))
    return plan.train_allocated / mp.GiB, resident / mp.GiB   # (train peak, weights + grads + optimizer state)


def active_params(layers: int) -> float:
    h, hd, q, kv, v = A3B["hidden_size"], A3B["head_dim"], A3B["num_attention_heads"], A3B["num_key_value_heads"], A3B["vocab_size"]
    attn = h * hd * (q + 2 * kv) + q * hd * h
    experts = A3B["num_experts_per_tok"] * 3 * h * A3B["moe_intermediate_size"]
    return layers * (attn + experts + h * A3B["num_experts"]) + 2 * v * h


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layer-spec", default="sdpa", help="sdpa (SequentialMLP experts) | te | local")
    ap.add_argument("--grouped-gemm", default="auto", help="model.moe.grouped_gemm: true (TEGroupedMLP, te spec) | auto (TEGroupedMLP on te) | false (SequentialMLP)")
    ap.add_argument("--iters", type=int, default=4, help="rounds; the first is a warm-up")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.data.batch import Batch
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.build import build_optimizer
    from megatron_rl.trainer.ddp import wrap_ddp_chunks
    from megatron_rl.trainer.policy import Policy

    path = make(Path(f"/tmp/qwen3_a3b_slice_{args.layers}l"), args.layers)
    init_distributed()
    torch.cuda.reset_peak_memory_stats()
    chunks = load_model_chunks(path, dtype="bfloat16", layer_spec=args.layer_spec,
                               moe=MoEConfig(grouped_gemm=args.grouped_gemm))
    experts = next(type(layer.mlp.experts).__name__ for layer in chunks[0].decoder.layers if hasattr(layer.mlp, "experts"))
    ddp = wrap_ddp_chunks(chunks, True)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-6), "bfloat16", 100)
    policy = Policy(chunks, micro_batch_size=1, optimizer=opt, scheduler=sched, ddp_model=ddp)
    b, p = args.rows, 128
    r = args.seq - p
    g = torch.Generator().manual_seed(0)
    batch = Batch({"prompt_ids": torch.randint(0, A3B["vocab_size"], (b, p), generator=g),
                   "prompt_mask": torch.ones(b, p, dtype=torch.long),
                   "response_ids": torch.randint(0, A3B["vocab_size"], (b, r), generator=g),
                   "response_mask": torch.ones(b, r), "advantages": torch.randn(b, r, generator=g)},
                  [{"uid": str(i), "group": i // 4} for i in range(b)])
    lp_times, up_times, resident = [], [], float("nan")
    for i in range(args.iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        batch["old_logprob"], _ = policy.compute_logprobs(batch)
        torch.cuda.synchronize()
        if i == 0:
            torch.cuda.reset_peak_memory_stats()        # the update's peak (optimizer state allocated in round 0)
        if i == 1:
            resident = torch.cuda.memory_allocated() / 2 ** 30   # weights + grads + optimizer state, between steps
        t1 = time.perf_counter()
        metrics = policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=i)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i:                                           # the first round compiles / allocates
            lp_times.append(t1 - t)
            up_times.append(t2 - t1)
    tokens = b * args.seq
    act = active_params(args.layers)
    lp, up = statistics.median(lp_times), statistics.median(up_times)
    print(f"Qwen3-30B-A3B-shaped slice: {args.layers} layers, 128 experts top-8, {act / 1e9:.2f}B active params, "
          f"{tokens} tokens per step, bf16, {args.layer_spec} spec ({experts} experts)")
    print(f"| pass | seconds (median of {len(up_times)}) | TFLOP/s on active params | peak GiB |")
    print("|---|---:|---:|---:|")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    try:
        planned, planned_resident = planned_train_gib(path, args.layer_spec, b, args.seq)
    except Exception as e:                              # the timing still counts
        print(f"planner failed: {type(e).__name__}: {e}")
        planned = planned_resident = float("nan")
    adam = type(getattr(opt, "optimizer", opt))
    adam = f"{adam.__module__}.{adam.__name__}"
    print(f"| log-probs (forward) | {lp:.3f} | {2 * act * tokens / lp / 1e12:.1f} | |")
    print(f"| PPO update (fwd + bwd + Adam) | {up:.3f} | {6 * act * tokens / up / 1e12:.1f} | {peak:.1f} |")
    err = 100 * (planned - peak) / peak
    print(f"planner train peak {planned:.2f} GiB vs measured {peak:.2f} GiB: relative error {err:+.1f}% "
          f"({'within' if abs(err) <= 10 else 'OUTSIDE'} 10%); resident between steps {resident:.2f} GiB vs planned "
          f"weights + grads + optimizer {planned_resident:.2f} GiB; optimizer {adam} (torch's foreach Adam keeps "
          "fp32 temporaries of the parameters in its step, TE/Apex FusedAdam does not; the planner counts none)")
    print(f"grad_norm {metrics[0]['grad_norm']:.4g}, update_ok {metrics[0]['update_ok']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            layer_spec=args.layer_spec, grouped_gemm=args.grouped_gemm, experts=experts, layers=args.layers,
            tokens=tokens, active_params=act, logprob_s=lp, update_s=up, logprob_tflops=2 * act * tokens / lp / 1e12,
            update_tflops=6 * act * tokens / up / 1e12, peak_gib=peak, planned_gib=planned, planner_err_pct=err,
            resident_gib=resident, planned_resident_gib=planned_resident, optimizer=adam,
            grad_norm=float(metrics[0]["grad_norm"]), update_ok=float(metrics[0]["update_ok"])), indent=1))
    return 0 if metrics[0]["update_ok"] == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
