"""Steering under TP=2 (two gloo processes): hook on every TP rank, logits equal TP=1."""
import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc


def _worker(rank, world, hf_dir, sae_dir, ids, out_path):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.collectives import gather_vocab_parallel
    from megatron_rl.steering import SteeringConfig, build_steering

    init_distributed(tp=world)
    model = load_checkpoint(hf_dir, layer_spec="local").eval()
    cfg = SteeringConfig(enable=True, sae_path=sae_dir, mode="clamp", feature_idxs=[3, 5],
                         max_activations=[2.0, 1.0], scope="generated")
    ctl = build_steering(cfg, model)
    assert ctl.active, f"rank {rank}: steering hook not attached"
    ctl.set_strengths(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    gen = torch.zeros_like(ids, dtype=torch.bool)
    gen[:, 4:] = True
    ctl.set_positions(gen)
    with torch.no_grad():
        steered = gather_vocab_parallel(gpt_forward(model, ids))
        with ctl.disabled():
            plain = gather_vocab_parallel(gpt_forward(model, ids))
    if rank == 0:
        torch.save({"steered": steered, "plain": plain}, out_path)
    destroy_distributed()


@pytest.mark.multiproc
def test_tp2_steered_logits_match_tp1(tmp_path):
    from megatron_rl.steering import save_sae
    from tests.steering.conftest import make_sae

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    save_sae(make_sae("jumprelu", layer=2), tmp_path / "sae")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    run_multiproc(_worker, 1, (hf, str(tmp_path / "sae"), ids, str(tmp_path / "tp1.pt")))
    run_multiproc(_worker, 2, (hf, str(tmp_path / "sae"), ids, str(tmp_path / "tp2.pt")))
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    assert (tp1["steered"] - tp2["steered"]).abs().max().item() < 1e-5
    assert torch.equal(tp1["steered"][:, :4], tp1["plain"][:, :4])          # prompt positions untouched
    assert (tp1["steered"][:, 4:] - tp1["plain"][:, 4:]).abs().max().item() > 1e-3
