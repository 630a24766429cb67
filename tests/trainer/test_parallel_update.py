"""A PPO update at TP=2 and at PP=2 (two gloo processes) gives the same loss and the
same updated weights as TP=1."""
import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc


def synthetic_batch(seed=0, b=4, p=5, r=6, vocab=96):
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, :2] = 0
    resp_mask = torch.ones(b, r)
    resp_mask[2, 4:] = 0
    return Batch({"prompt_ids": torch.randint(0, vocab, (b, p), generator=g), "prompt_mask": prompt_mask,
                  "response_ids": torch.randint(0, vocab, (b, r), generator=g), "response_mask": resp_mask,
                  "advantages": torch.randn(b, r, generator=g) * resp_mask,
                  "old_logprob": (-torch.rand(b, r, generator=g) * 3 - 2) * resp_mask},
                 [{"uid": str(i), "group": i // 2} for i in range(b)])


def _update(rank, world, hf, tp, pp, out):
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    init_distributed(tp=tp, pp=pp)
    model = load_checkpoint(hf, layer_spec="local")
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0), "float32", 10)
    policy = Policy(model, micro_batch_size=2, optimizer=opt, scheduler=sched, ddp_model=ddp)
    batch = synthetic_batch()
    lp, _ = policy.compute_logprobs(batch)
    metrics = policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    weights = dict(iter_hf_weights(model))
    if torch.distributed.get_rank() == 0:
        torch.save({"logprob": lp, "metrics": metrics, "weights": weights}, out)
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_update_matches_tp1(tmp_path, tp, pp):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run_multiproc(_update, 1, (hf, 1, 1, str(tmp_path / "ref.pt")))
    run_multiproc(_update, 2, (hf, tp, pp, str(tmp_path / "par.pt")))
    ref, par = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "par.pt")
    assert (ref["logprob"] - par["logprob"]).abs().max() < 1e-5
    for k in ("pg_loss", "grad_norm", "pg_clipfrac"):
        assert abs(ref["metrics"][0][k] - par["metrics"][0][k]) < 1e-5, k
    assert ref["metrics"][0]["grad_norm"] > 0
    # Adam divides by sqrt(v): elements whose gradient is ~0 may differ by a fraction
    # of lr (1e-3) between layouts, so bound the max by 5% of lr and the mean tightly.
    for name, w in ref["weights"].items():
        d = (w - par["weights"][name]).abs()
        assert d.max() < 5e-5 and d.mean() < 1e-6, name
