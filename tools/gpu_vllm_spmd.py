"""SPMD vLLM next to a TP=2 Megatron actor: the colocated layout of multi-GPU RL.

    python3 -m torch.distributed.run --nproc-per-node 2 tools/gpu_vllm_spmd.py \
        --model-config .cache/demo/SmolLM2-135M-Instruct        # (tools/gpu_session.sh vspmd)

Each torchrun rank holds one Megatron TP shard of a ~1B Llama (random weights) and one vLLM
TP rank (`tensor_parallel_size=2`, `distributed_executor_backend=external_launcher`, sleep
mode on; `rollout.vllm` keys of the same names). Checks: weight sync from the TP=2 training
layout into vLLM's TP=2 layout (time, GB/s), vLLM log-probs of sampled tokens vs the actor's
after the sync and again after a sleep/wake cycle, both ranks generating the same tokens,
tokens/s. Rank 0 prints the table and writes $OUT/vllm_spmd.md.

`--mode grpo`: GRPO steps through the real Trainer at DP=2 (SmolLM2 shape, TP=1), each rank
with its own vLLM rank built by `VLLMEngine.from_config` ($OUT/vllm_spmd_grpo.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gpu_vllm import (ROWS, llama_1b_config_dir, make_llm, masked_diff, prompts_batch, row,  # noqa: E402
                            section, sync_cuda, timed_generate)


def compare(label: str, engine, policy, tok, n: int = 64) -> None:
    from megatron_rl.rollout.protocol import SamplingParams

    out = engine.generate(prompts_batch(tok, n), SamplingParams(temperature=1.0, max_new_tokens=64, seed=5))
    lp, _ = policy.compute_logprobs(out)
    m, x = masked_diff(lp, out["rollout_logprob"], out["response_mask"])
    row("logprobs", f"{label}: vLLM vs Megatron TP=2, mean / max abs diff", f"{m:.4f} / {x:.4f}")
    ids = out["response_ids"].cuda()
    gathered = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, ids)
    row("logprobs", f"{label}: both ranks generated the same tokens", all(torch.equal(g, ids) for g in gathered))


def sec_sync(engine, policy, reps: int = 3) -> None:
    times, res = [], None
    for _ in range(reps):
        dist.barrier()
        sync_cuda()
        t = time.perf_counter()
        res = engine.sync_weights(policy)
        sync_cuda()
        times.append(time.perf_counter() - t)
    sec, gb = statistics.median(times), res["weight_sync/bytes"] / 1e9
    row("sync", f"TP=2 Megatron -> TP=2 vLLM, {gb:.2f} GB per rank, s (median of {reps})", sec)
    row("sync", "GB/s per rank (TP gather + buckets + load)", gb / sec)


def sec_tokens(engine, tok) -> None:
    from megatron_rl.rollout.protocol import SamplingParams

    batch = prompts_batch(tok, 256)
    sp = SamplingParams(temperature=1.0, max_new_tokens=128, seed=1)
    timed_generate(engine, batch.select(range(16)), sp)
    toks, dt = timed_generate(engine, batch, sp)
    row("tokens/s", "vLLM TP=2 (eager, SPMD), 256 x 128", toks / dt)


def random_llama_1b(model_config: Path, out: Path) -> Path:
    """~1B Llama with random bf16 weights saved as an HF checkpoint (TP=2-divisible heads)."""
    import transformers

    llama_1b_config_dir(out, model_config)
    if not list(out.glob("*.safetensors")):
        cfg = transformers.AutoConfig.from_pretrained(out)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


def grpo_dp(model_config: Path, tp: int) -> None:
    """GRPO steps through the real Trainer at DP = world / tp: every rank builds its own vLLM
    rank via `VLLMEngine.from_config` (external_launcher picked automatically; vLLM TP = model
    TP, so each vLLM TP group is one trainer DP rank), rolls out its DP rank's prompts and
    syncs the updated weights each step. tp=1: SmolLM2 shape; tp>1: the ~1B Llama."""
    import json
    import subprocess

    from megatron_rl.config import load_experiment_config
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.main import build_trainer
    from tools.gpu_validate import make_random_model

    init_distributed(tp=tp)
    model_dir = Path("/tmp/smollm2-random-dp") if tp == 1 else Path("/tmp/llama-1b-weights")
    data, run_dir = Path("/tmp/vllm_dp_data"), Path(f"/tmp/vllm_dp_run_tp{tp}")
    if dist.get_rank() == 0:
        make_random_model(model_config, model_dir) if tp == 1 else random_llama_1b(model_config, model_dir)
        subprocess.run([sys.executable, "tools/make_quickstart_data.py", "--out", str(data), "--n-train", "128",
                        "--n-val", "64"], check=True)
    dist.barrier()
    overrides = [f"model.path={model_dir}", "model.dtype=bfloat16", "model.layer_spec=sdpa", "rollout.engine=vllm",
                 "rollout.gpu_memory_utilization=0.3", f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.val_files=[{data / 'val.jsonl'}]", "data.train_batch_size=32", "data.val_batch_size=64",
                 "rollout.n=8", "rollout.max_new_tokens=64", "actor.micro_batch_size=64", "reward.num_workers=0",
                 "trainer.total_steps=3", "trainer.val_before_train=false", f"logging.run_dir={run_dir}",
                 "logging.sinks=[jsonl]", f"model.tp={tp}", f"rollout.vllm.tensor_parallel_size={tp}"]
    trainer = build_trainer(load_experiment_config("configs/quickstart_cpu.yaml", overrides))
    row("grpo", "vLLM executor picked", trainer.engine.cfg.distributed_executor_backend or "default")
    t = time.perf_counter()
    trainer.fit()
    trainer.logger.close()
    row("grpo", f"DP={dist.get_world_size() // tp} x TP={tp}: 3 steps + validation, s", time.perf_counter() - t)
    if dist.get_rank() == 0:
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        for step in (1, 2, 3):
            m = {k: v for ln in lines if ln.get("step") == step for k, v in ln.items()}
            for k in ("timing/step", "timing/rollout", "timing/update", "timing/weight_sync",
                      "rollout/logprob_diff", "rollout/logprob_diff_max", "val/reward"):
                if k in m:
                    row("grpo", f"step {step} {k}", float(m[k]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-config", required=True, help="directory with a tokenizer (SmolLM2's)")
    ap.add_argument("--mode", choices=["layout", "grpo"], default="layout",
                    help="layout: TP=2 actor + TP=2 vLLM checks; grpo: Trainer steps with vLLM, DP = world / tp")
    ap.add_argument("--tp", type=int, default=1, help="grpo: model and vLLM tensor parallel size")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # external_launcher: the worker is this process
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        sys.stdout = open(os.devnull, "w")
    if args.mode == "grpo":
        section("grpo", grpo_dp, Path(args.model_config), args.tp)
        return finish(f"vllm_spmd_grpo_tp{args.tp}.md")

    import transformers

    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.models.provider import build_model
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.vllm_config import VLLMConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.trainer.policy import Policy

    init_distributed(tp=2)
    big = Path("/tmp/llama-1b-spmd")
    if rank == 0:
        llama_1b_config_dir(big, Path(args.model_config))
    dist.barrier()
    tok = transformers.AutoTokenizer.from_pretrained(big)
    actor = build_model(arch_from_hf_config(big), dtype="bfloat16", layer_spec="sdpa").cuda()
    policy = Policy(actor, micro_batch_size=32)
    row("setup", "actor parameters per rank (B)", sum(p.numel() for p in actor.parameters()) / 1e9)
    vcfg = VLLMConfig(tensor_parallel_size=2, distributed_executor_backend="external_launcher", sleep_level=1)
    t = time.time()
    llm = make_llm(big, 0.4, sleep_mode=True, tensor_parallel_size=2, load_format="dummy",
                   distributed_executor_backend="external_launcher")
    row("setup", "vLLM LLM() start (TP=2, external_launcher), s", time.time() - t)
    engine = VLLMEngine(llm, tok, vcfg, colocate=True, dtype=torch.bfloat16)
    section("logprobs", compare, "before any sync (dummy weights)", engine, policy, tok)
    section("sync", sec_sync, engine, policy)
    section("logprobs", compare, "after the sync", engine, policy, tok)
    engine.sleep()
    section("sync", sec_sync, engine, policy, 1)
    section("logprobs", compare, "after sleep, wake and sync", engine, policy, tok)
    section("tokens/s", sec_tokens, engine, tok)
    return finish("vllm_spmd.md")


def finish(name: str) -> int:
    table = "| section | metric | value |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in ROWS)
    print("\n" + table, flush=True)
    if dist.get_rank() == 0 and os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], name).write_text(table + "\n")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
