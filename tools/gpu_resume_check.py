"""Elastic resume under Megatron's distributed optimizer (bf16): a run saved at DP=2 after one
update and resumed at DP=1 takes the same next update as the uninterrupted DP=2 run, because
the checkpoint carries the optimizer's state (fp32 master params, Adam moments, step) in
Megatron's fully reshardable layout (`trainer/checkpoint.py` `save_policy`:
`optimizer.sharded_state_dict(..., distrib_optim_sharding_type=fully_sharded_model_space)`).
Prints the max abs weight difference after the next update against the uninterrupted run.

    torchrun --nproc-per-node 2 tools/gpu_resume_check.py save
    torchrun --nproc-per-node 1 tools/gpu_resume_check.py resume
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path("/tmp/mrl_resume_check")


def build(hf):
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import load_checkpoint
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    model = load_checkpoint(hf, dtype="bfloat16", layer_spec="sdpa")
    ddp = wrap_ddp(model, True)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-4, distributed_optimizer=True), "bfloat16", 10)
    return Policy(model, micro_batch_size=4, optimizer=opt, scheduler=sched, ddp_model=ddp, fused_backend="torch")


def weights(policy):
    from megatron_rl.models import iter_hf_weights
    return {n: w.detach().float().cpu().clone() for n, w in iter_hf_weights(policy.model)}


def update_global(policy, seed):
    """This DP rank's share of one global batch of 8 rows."""
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.parallel.data_parallel import shard_for_dp
    from tests.trainer.test_parallel_update import synthetic_batch

    batch = synthetic_batch(seed=seed, b=8, p=16, r=32, vocab=96).select(shard_for_dp(list(range(8))))
    return policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=seed)


def main(phase: str) -> int:
    import torch.distributed as dist

    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.checkpoint import load_policy, save_policy, uses_distributed_optimizer
    from tests.helpers import make_tiny_hf

    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    torch.use_deterministic_algorithms(True, warn_only=True)
    init_distributed()
    rank0 = dist.get_rank() == 0
    hf = OUT / "hf"
    if phase == "save":
        if rank0:
            shutil.rmtree(OUT, ignore_errors=True)
            make_tiny_hf(hf, "llama", tie=False, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
        dist.barrier()
    a = build(str(hf))
    assert uses_distributed_optimizer(a.optimizer), "expected Megatron's distributed optimizer"
    if phase == "save":
        update_global(a, 0)
        save_policy(a, OUT / "ckpt")
        update_global(a, 1)
        if rank0:
            torch.save(weights(a), OUT / "straight.pt")
        print(f"saved at DP={dist.get_world_size()}")
        return 0
    load_policy(a, OUT / "ckpt")
    update_global(a, 1)
    straight, resumed = torch.load(OUT / "straight.pt"), weights(a)
    c = build(str(hf))                                  # weights only: Adam restarts from zero
    from megatron_rl.models import load_mcore_checkpoint
    load_mcore_checkpoint(c.chunks, OUT / "ckpt")
    update_global(c, 1)
    diff = lambda w: max(float((w[k] - straight[k]).abs().max()) for k in straight)
    now, fresh = diff(resumed), diff(weights(c))
    print(f"| resumed at DP={dist.get_world_size()} from DP=2 | max abs weight diff after the next update vs "
          f"uninterrupted |")
    print("|---|---:|")
    print(f"| weights + optimizer state (sharded, fully reshardable) | {now:.3g} |")
    print(f"| weights only (fresh Adam) | {fresh:.3g} |")
    return 0 if now < 1e-3 and now < fresh else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "save"))
