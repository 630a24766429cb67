"""vLLM 0.26 on a Qwen3-MoE (issue #19), one GPU: the weight sync of a Megatron MoE actor into
vLLM's fused-MoE layers (GB/s), and routing replay with vLLM's own routing
(`enable_return_routed_experts`).

Model: a Qwen3-30B-A3B-shaped slice (tools/bench_moe_slice.py: hidden 2048, 128 experts top-8,
vocab 151936) with `--layers` layers, random bf16 weights written by transformers; vLLM loads
the same checkpoint (`skip_tokenizer_init`: prompts are token ids).

  1. sync     perturb the actor, `engine.update_weights(iter_hf_weights(actor))` at buckets of
              256 and 64 MB: seconds, GB/s, and the device-to-device copy GB/s of the same run.
  2. routing  generate with vLLM (routed experts returned), then the actor's log-prob pass
              with and without routing replay: `moe/replay_agree_frac` (1.0 expected),
              `moe/replay_mismatch_frac` (tokens whose trainer routing differs from vLLM's in
              some layer) and the rollout/trainer log-prob gap with and without replay.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=/tmp/vsite:$PYTHONPATH python3 tools/gpu_vllm_moe.py [--layers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROWS: list[tuple[str, str]] = []


def row(metric: str, value) -> None:
    v = f"{value:.4g}" if isinstance(value, float) else str(value)
    ROWS.append((metric, v))
    print(f"{metric}: {v}", flush=True)


def print_table() -> None:
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in ROWS)
    print("\n" + table, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vllm_moe.json").write_text(json.dumps(ROWS, indent=1))


def timed_sync(engine, actor, bucket_mb: int, reps: int = 3) -> None:
    from megatron_rl.models.loading import iter_hf_weights

    engine.bucket_mb = bucket_mb
    times, res = [], {}
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = engine.update_weights(iter_hf_weights(actor))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    sec, gb = statistics.median(times), res["weight_sync/bytes"] / 1e9
    row(f"sync bucket {bucket_mb} MB: {gb:.3f} GB, s (median of {reps})", sec)
    row(f"sync bucket {bucket_mb} MB: GB/s (gather + bucket + vLLM load_weights)", gb / sec)


def gap(policy, batch) -> tuple[float, dict]:
    lp, _ = policy.compute_logprobs(batch)
    m = batch["response_mask"]
    g = float(((lp.float() - batch["rollout_logprob"].float()).abs() * m).sum() / m.sum())
    return g, ({} if policy.routing_replay is None else policy.routing_replay.collect())


def section_sync(engine, actor) -> None:
    with torch.no_grad():            # vLLM must really take new weights
        for p in actor.parameters():
            p.mul_(1.01)
    for mb in (256, 64):
        timed_sync(engine, actor, mb)


def section_routing(engine, actor, args) -> None:
    from megatron_rl.data.batch import Batch
    from megatron_rl.rollout.protocol import SamplingParams
    from megatron_rl.trainer.policy import Policy

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 150000, (args.rows, 48), generator=g)
    mask = torch.ones_like(ids)
    for i in range(0, args.rows, 3):
        mask[i, : 1 + i % 17] = 0                # left padding of varying length
    batch = Batch({"prompt_ids": ids * mask, "prompt_mask": mask}, [{"uid": str(i)} for i in range(args.rows)])
    t = time.perf_counter()
    out = engine.generate(batch, SamplingParams(n=1, max_new_tokens=args.new_tokens, temperature=1.0, seed=1))
    row("vLLM generate with routed experts, s", time.perf_counter() - t)
    resp = out["response_routed_experts"]
    fed = (out["response_mask"] > 0).clone()
    lengths = fed.sum(-1).long()
    fed[torch.arange(len(out)), (lengths - 1).clamp(min=0)] = False     # the last token is never fed
    row("routing tensors (prompt, response)", f"{tuple(out['prompt_routed_experts'].shape)} "
        f"{tuple(resp.shape)} {resp.dtype}")
    row("fed response tokens with routing in every MoE layer (frac)", float((resp[fed] > 0).all(-1).all(-1).float().mean()))
    on, off = Policy(actor, micro_batch_size=8, routing_replay=True), Policy(actor, micro_batch_size=8)
    gap_on, metrics = gap(on, out)
    gap_off, _ = gap(off, out)
    for k, v in metrics.items():
        row(k, v)
    if "moe/replay_mismatch_frac" in metrics:
        row("tokens whose trainer routing (no replay) equals vLLM's in every MoE layer (frac)",
            1.0 - metrics["moe/replay_mismatch_frac"])
    row("rollout/logprob_diff without replay", gap_off)
    row("rollout/logprob_diff with replay", gap_on)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    try:
        return run(args)
    except Exception as e:                      # start-up failed: still print what was measured
        traceback.print_exc()
        row("start-up ERROR", f"{type(e).__name__}: {e}"[:200])
        return 1
    finally:
        print_table()


def run(args) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    import vllm

    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.vllm_config import VLLMConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine, replay_layers
    from tools.bench_moe_slice import make
    from tools.gpu_vllm import d2d_bandwidth

    path = make(Path(f"/tmp/qwen3-a3b-slice-{args.layers}l"), args.layers)
    init_distributed()
    actor = load_checkpoint(path, dtype="bfloat16", layer_spec="sdpa", moe=MoEConfig(routing_replay=True))
    row("actor parameters (B)", sum(p.numel() for p in actor.parameters()) / 1e9)
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(path=str(path), moe=MoEConfig(routing_replay=True)))
    layers = replay_layers(cfg)
    t = time.time()
    llm = vllm.LLM(model=str(path), skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, seed=0,
                   gpu_memory_utilization=0.35, max_model_len=1024, enable_prefix_caching=True,
                   enable_return_routed_experts=True, logprobs_mode="processed_logprobs", generation_config="vllm")
    row("vLLM LLM() start, s", time.time() - t)
    tok = types.SimpleNamespace(eos_token_id=151645, pad_token_id=0)
    engine = VLLMEngine(llm, tok, VLLMConfig(sleep_level=0), colocate=False, bucket_mb=256, dtype=torch.bfloat16,
                        routing_layers=layers)
    row("device-to-device copy GB/s (same run)", d2d_bandwidth())
    try:
        section_sync(engine, actor)
    except Exception as e:
        traceback.print_exc()
        row("sync ERROR", f"{type(e).__name__}: {e}"[:200])
    try:
        section_routing(engine, actor, args)
    except Exception as e:
        traceback.print_exc()
        row("routing ERROR", f"{type(e).__name__}: {e}"[:200])
    return 0


if __name__ == "__main__":
    sys.exit(main())
