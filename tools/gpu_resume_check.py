"""Resume under Megatron's distributed optimizer on one GPU (bf16): a run saved after one
update and resumed takes the same next update as the uninterrupted run, because the
checkpoint now carries the optimizer's parameter state (fp32 master params, Adam moments;
`trainer/checkpoint.py` `save_policy`). For contrast, the old checkpoint content (weights +
`optimizer.state_dict()` only) is resumed too. Prints the max abs weight difference after
the next update for both, against the uninterrupted run.

    python3 tools/gpu_resume_check.py
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


def update(policy, seed):
    from megatron_rl.algos.config import AlgosConfig
    from tests.trainer.test_parallel_update import synthetic_batch

    batch = synthetic_batch(seed=seed, b=8, p=16, r=32, vocab=96)
    return policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=seed)


def weights(policy):
    return {n: p.detach().float().clone() for n, p in policy.model.named_parameters()}


def main() -> int:
    from megatron_rl.models import load_mcore_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.checkpoint import load_policy, save_policy, uses_distributed_optimizer
    from tests.helpers import make_tiny_hf

    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    torch.use_deterministic_algorithms(True, warn_only=True)
    init_distributed()
    shutil.rmtree(OUT, ignore_errors=True)
    hf = make_tiny_hf(OUT / "hf", "llama", tie=False, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    a = build(hf)
    assert uses_distributed_optimizer(a.optimizer), "expected Megatron's distributed optimizer"
    update(a, 0)
    save_policy(a, OUT / "ckpt")
    update(a, 1)
    straight = weights(a)
    b = build(hf)
    load_policy(b, OUT / "ckpt")
    update(b, 1)
    c = build(hf)                                   # what the checkpoint held before: no parameter state
    load_mcore_checkpoint(c.chunks, OUT / "ckpt")
    c.optimizer.load_state_dict(torch.load(OUT / "ckpt" / "rank00000.pt", weights_only=True)["optimizer"])
    update(c, 1)
    diff = lambda w: max(float((w[k] - straight[k]).abs().max()) for k in straight)
    print("| resumed from | max abs weight diff after the next update vs uninterrupted |")
    print("|---|---:|")
    print(f"| weights + state_dict + distributed-optimizer parameter state (now) | {diff(weights(b)):.3g} |")
    print(f"| weights + state_dict only (before) | {diff(weights(c)):.3g} |")
    now, before = diff(weights(b)), diff(weights(c))
    return 0 if now < 1e-3 and not now >= before else 1     # `before` is NaN: Adam resumed from dummy state


if __name__ == "__main__":
    raise SystemExit(main())
