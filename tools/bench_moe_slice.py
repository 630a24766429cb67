"""A Qwen3-30B-A3B-shaped slice on one GPU: its width (hidden 2048, 32 heads, 4 KV heads,
head_dim 128), 128 experts with top-8 routing (moe_intermediate 768, norm_topk_prob) and
vocab 151936, but 4 layers; random weights written by transformers, loaded into Megatron-Core
(sdpa spec: SequentialMLP experts, alltoall dispatcher, router in fp32), bf16. Times one
PPO update (Policy.update: forward + backward + Adam) on 8 x 2048 tokens and the log-prob
pass, and prints TFLOP/s counted on the active parameters (6 x active x tokens for the update).

    python3 tools/bench_moe_slice.py [--layers 4] [--rows 8] [--seq 2048]
"""
from __future__ import annotations

import argparse
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
    transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


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
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.data.batch import Batch
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.build import build_optimizer
    from megatron_rl.trainer.ddp import wrap_ddp_chunks
    from megatron_rl.trainer.policy import Policy

    path = make(Path(f"/tmp/qwen3_a3b_slice_{args.layers}l"), args.layers)
    init_distributed()
    torch.cuda.reset_peak_memory_stats()
    chunks = load_model_chunks(path, dtype="bfloat16", layer_spec="sdpa")
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
    lp_times, up_times = [], []
    for i in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        batch["old_logprob"], _ = policy.compute_logprobs(batch)
        torch.cuda.synchronize()
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
          f"{tokens} tokens per step, bf16, sdpa spec (SequentialMLP experts)")
    print("| pass | seconds (median of 3) | TFLOP/s on active params | peak GiB |")
    print("|---|---:|---:|---:|")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"| log-probs (forward) | {lp:.3f} | {2 * act * tokens / lp / 1e12:.1f} | {peak:.1f} |")
    print(f"| PPO update (fwd + bwd + Adam) | {up:.3f} | {6 * act * tokens / up / 1e12:.1f} | {peak:.1f} |")
    print(f"grad_norm {metrics[0]['grad_norm']:.4g}, update_ok {metrics[0]['update_ok']}")
    return 0 if metrics[0]["update_ok"] == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
