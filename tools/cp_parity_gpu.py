"""Two-GPU (NCCL) context-parallel parity: CP=2 against CP=1 on one PPO step, per layer spec
and micro-batch kind (issue #20's CP item; docs/run_plan.md "Context parallelism").

Run under torchrun with 2 processes (on CPU with gloo for a smoke test: `--tiny`):

    torchrun --standalone --nproc-per-node 2 tools/cp_parity_gpu.py [--json OUT.json]

Sections, each guarded (a failure prints its error in the table and the next one runs):
sdpa padded, sdpa packed, te packed (te padded is refused by the run plan: TE's CP attention
takes no padding mask). The CP=1 reference runs in the same launch as DP=2 on an identical
batch (its gradient equals one GPU's). Compared: log-probs before the step, pg_loss and grad
norm of the step, the Adam update `w_after - w_before` (relative L2 and max), and per layout
the wall time of log-probs + update and the peak allocated memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gpu_multi_check import _rel_l2, make_random_llama, progress, synthetic_batch  # noqa: E402

SECTIONS = (("sdpa", "padded"), ("sdpa", "packed"), ("te", "packed"))


def one_step(hf: Path, cp: int, spec: str, packed_budget: int, dtype: str, batch, lr: float) -> dict:
    from megatron.core import parallel_state as mpu

    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    init_distributed(tp=1, pp=1, cp=cp)
    try:
        progress(f"cp={cp} {spec} budget={packed_budget}: building")
        model = load_checkpoint(str(hf), layer_spec=spec, dtype=getattr(torch, dtype))
        before = {k: v.float().cpu() for k, v in iter_hf_weights(model)}
        ddp = wrap_ddp(model, False)
        opt, sched = build_optimizer(ddp, OptimConfig(lr=lr, clip_grad=1.0, distributed_optimizer=False), dtype, 10)
        policy = Policy(model, micro_batch_size=2, optimizer=opt, scheduler=sched, ddp_model=ddp,
                        max_tokens_per_microbatch=packed_budget)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        lp, _ = policy.compute_logprobs(batch)
        if "old_logprob" not in batch:   # the first reference sets it; every later run reuses it
            g = torch.Generator().manual_seed(1)
            batch["old_logprob"] = (lp.float().cpu() + 0.05 * torch.randn(lp.shape, generator=g)) * batch["response_mask"]
        metrics = policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.time() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        delta = {k: v.float().cpu() - before[k] for k, v in iter_hf_weights(model)}
        out = {"logprob": lp.float().cpu(), "metrics": metrics[0], "delta": delta, "time_s": elapsed, "peak_gib": peak}
        del policy, opt, ddp, model
        return out
    finally:
        mpu.destroy_model_parallel()


def compare(ref: dict, par: dict) -> dict:
    return {"logprob_max_diff": float((ref["logprob"] - par["logprob"]).abs().max()),
            "pg_loss_ref": ref["metrics"]["pg_loss"], "pg_loss": par["metrics"]["pg_loss"],
            "grad_norm_ref": ref["metrics"]["grad_norm"], "grad_norm": par["metrics"]["grad_norm"],
            "delta_rel_l2": _rel_l2(ref["delta"], par["delta"]),
            "delta_max_diff": max(float((par["delta"][k] - d).abs().max()) for k, d in ref["delta"].items()),
            "time_s_cp1": ref["time_s"], "time_s_cp2": par["time_s"],
            "peak_gib_cp1": ref["peak_gib"], "peak_gib_cp2": par["peak_gib"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small model and batch (CPU/gloo smoke run)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--response-len", type=int, default=None, help="response tokens per row (GPU default 3968)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", default=",".join(f"{s}-{m}" for s, m in SECTIONS))
    ap.add_argument("--hang-timeout", type=float, default=540)
    args = ap.parse_args()
    import faulthandler
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    from megatron.core import parallel_state as mpu

    from megatron_rl.parallel import init_distributed

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() and not args.tiny else "float32")
    init_distributed(tp=1, pp=1, timeout_s=int(args.hang_timeout))
    if dist.get_world_size() != 2:
        raise SystemExit("run with exactly 2 processes (torchrun --nproc-per-node 2)")
    mpu.destroy_model_parallel()
    root = Path(os.environ.get("GPU_CHECK_DIR", tempfile.gettempdir())) / ("mrl_tiny" if args.tiny else "mrl_llama")
    if dist.get_rank() == 0:
        make_random_llama(root, tiny=args.tiny)
    dist.barrier()
    vocab, p = (96, 16) if args.tiny else (32000, 128)
    r = args.response_len or (12 if args.tiny else 3968)
    budget = 2 * (p + r)
    rows: dict[str, dict] = {}
    for name in args.sections.split(","):
        spec, mode = name.split("-")
        batch = synthetic_batch(vocab, 4, p, r)
        try:
            ref = one_step(root, 1, spec, budget if mode == "packed" else 0, dtype, batch, args.lr)
            rows[name] = compare(ref, one_step(root, 2, spec, budget if mode == "packed" else 0, dtype, batch, args.lr))
        except Exception as e:                                   # noqa: BLE001 - the table reports it
            rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
            if dist.get_rank() == 0:
                traceback.print_exc()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if dist.get_rank() == 0:
        print(f"\nCP=2 vs CP=1 (DP=2), {dtype}, 4 rows x ({p} prompt + {r} response) tokens")
        print("| section | logprob max diff | pg_loss (cp1 / cp2) | grad norm (cp1 / cp2) | Adam update rel. L2 | "
              "update max diff | s (cp1 / cp2) | peak GiB (cp1 / cp2) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, x in rows.items():
            if "error" in x:
                print(f"| {name} | error: {x['error']} |||||||")
                continue
            print(f"| {name} | {x['logprob_max_diff']:.2e} | {x['pg_loss_ref']:.5f} / {x['pg_loss']:.5f} | "
                  f"{x['grad_norm_ref']:.4f} / {x['grad_norm']:.4f} | {x['delta_rel_l2']:.2e} | "
                  f"{x['delta_max_diff']:.2e} | {x['time_s_cp1']:.2f} / {x['time_s_cp2']:.2f} | "
                  f"{x['peak_gib_cp1']:.2f} / {x['peak_gib_cp2']:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    from megatron_rl.parallel import destroy_distributed
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
