"""DP=2 with ranks holding different numbers of response tokens: the token-mean update is
the global batch's (each rank divides by the DP-mean token count, then DDP averages), so it
equals DP=1 on the whole batch."""
import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc
from tests.trainer.test_parallel_update import synthetic_batch


def _batch():
    b = synthetic_batch(b=4)
    b["response_mask"][2:, 2:] = 0.0          # rows 2-3 (rank 1 at DP=2) have 2 tokens, rows 0-1 have 6
    b["advantages"] = b["advantages"] * b["response_mask"]
    return b


def _update(rank, world, hf, out):
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    init_distributed(tp=1, pp=1)
    torch.manual_seed(0)
    model = load_checkpoint(hf, layer_spec="local")
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=0.0), "float32", 10)
    policy = Policy(model, micro_batch_size=1, optimizer=opt, scheduler=sched, ddp_model=ddp)
    batch = _batch()
    if world == 2:
        batch = batch.select(range(2 * rank, 2 * rank + 2))
    policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    if rank == 0:
        torch.save({n: w.clone() for n, w in iter_hf_weights(model)}, out)
    destroy_distributed()


@pytest.mark.multiproc
def test_dp2_token_mean_update_equals_dp1_with_unequal_token_counts(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run_multiproc(_update, 1, (hf, str(tmp_path / "dp1.pt")))
    run_multiproc(_update, 2, (hf, str(tmp_path / "dp2.pt")))
    before = dict(torch.load(tmp_path / "dp1.pt"))
    one, two = torch.load(tmp_path / "dp1.pt"), torch.load(tmp_path / "dp2.pt")
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-4, worst              # Adam's first step moves each weight by ~lr = 1e-3
    assert before
