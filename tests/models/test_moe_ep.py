"""Expert parallelism (two gloo processes, DP=2 x EP=2): each rank loads only its
experts; logits equal transformers' (= EP=1); the HF export stream gathers every
expert back bit for bit; a dist-checkpoint saved at EP=2 loads at EP=1."""
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_tiny_hf, run_multiproc


def _ep_worker(rank, world, hf_dir, ids, am, ckpt_dir, out, tp=1, ep=2, etp=None):
    import transformers
    from megatron.core import parallel_state as mpu
    from megatron_rl.models import iter_hf_weights, load_checkpoint, save_mcore_checkpoint
    from megatron_rl.models.forward import gpt_forward, position_ids_from_mask
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.collectives import gather_vocab_parallel

    init_distributed(tp=tp, ep=ep, etp=etp)
    model = load_checkpoint(hf_dir, layer_spec="local").eval()
    experts = [n for n, _ in model.named_parameters() if "local_experts" in n and "layers.0." in n]
    assert len(experts) == 2 * 4 // ep, experts          # fc1 + fc2 of this rank's experts only
    # Different tokens per data-parallel rank: the alltoall really exchanges them.
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    mine_ids, mine_am = ids[dp_rank::dp], am[dp_rank::dp]
    with torch.no_grad():
        got = gather_vocab_parallel(gpt_forward(model, mine_ids, mine_am))[..., :96]
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(
            input_ids=mine_ids, attention_mask=mine_am, position_ids=position_ids_from_mask(mine_am)).logits
    keep = mine_am.bool()
    assert (got[keep] - ref[keep]).abs().max().item() < 1e-4
    exported = dict(iter_hf_weights(model))
    if ckpt_dir:
        save_mcore_checkpoint(model, ckpt_dir)
    if rank == 0:
        torch.save(exported, out)
    destroy_distributed()


def _ep1_from_mcore(rank, world, ckpt_dir, out):
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed()
    model = load_checkpoint(ckpt_dir, layer_spec="local")
    torch.save(dict(iter_hf_weights(model)), out)
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_ep2_logits_export_and_checkpoint_match_ep1(tmp_path, family):
    hf = make_tiny_hf(tmp_path / "hf", family, tie=False)
    ids = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    run_multiproc(_ep_worker, 2, (hf, ids, am, str(tmp_path / "mc"), str(tmp_path / "ep2.pt")))
    ref = load_file(tmp_path / "hf" / "model.safetensors")
    got = torch.load(tmp_path / "ep2.pt")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    run_multiproc(_ep1_from_mcore, 1, (str(tmp_path / "mc"), str(tmp_path / "ep1.pt")))
    back = torch.load(tmp_path / "ep1.pt")
    for k in ref:
        assert torch.equal(back[k], ref[k]), k


def _sgd_step(rank, world, hf_dir, ids, out, moe):
    """One SGD step (clipped) on this rank's rows; saves the updated HF tensors."""
    import torch.nn.functional as F
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.trainer.ddp import wrap_ddp_chunks

    init_distributed(ep=world)
    model = load_checkpoint(hf_dir, layer_spec="local", moe=MoEConfig(**moe))
    ddp = wrap_ddp_chunks(model, use_dist_opt=False)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=0.5, clip_grad=0.05), ddp)
    rows = ids.chunk(world)[rank]                      # equal rows per rank: mean of means = full mean
    logits = gpt_forward(ddp[0], rows)[:, :-1, :96]
    loss = F.cross_entropy(logits.reshape(-1, 96), rows[:, 1:].reshape(-1))
    loss.backward()
    finalize_model_grads(ddp)
    ok, grad_norm, _ = opt.step()
    assert ok
    full = dict(iter_hf_weights(model))
    if rank == 0:
        torch.save({"weights": full, "grad_norm": grad_norm}, out)
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("etp", [1, 2])
def test_moe_tp2_logits_and_export_match_hf(tmp_path, etp):
    """TP=2 with experts split over expert-TP (etp=2) or whole on each TP rank (etp=1)."""
    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", tie=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    run_multiproc(_ep_worker, 2, (hf, ids, am, None, str(tmp_path / "tp2.pt"), 2, 1, etp))
    ref = load_file(tmp_path / "hf" / "model.safetensors")
    got = torch.load(tmp_path / "tp2.pt")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.multiproc
def test_ep2_sgd_step_equals_ep1(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", tie=False)
    ids = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(3))
    run_multiproc(_sgd_step, 1, (hf, ids, str(tmp_path / "ep1.pt"), {}))
    run_multiproc(_sgd_step, 2, (hf, ids, str(tmp_path / "ep2.pt"), {}))
    a, b = torch.load(tmp_path / "ep1.pt"), torch.load(tmp_path / "ep2.pt")
    ref = load_file(tmp_path / "hf" / "model.safetensors")
    assert a["grad_norm"] > 0.05                        # the clip is active: the norm spans EP ranks
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"]
    moved = 0
    for k, w in a["weights"].items():
        assert (w - b["weights"][k]).abs().max().item() < 1e-6, k
        moved += int(not torch.equal(w, ref[k]))
    assert moved > len(ref) // 2


@pytest.mark.parametrize("key", ["aux_loss_coef", "z_loss_coef"])
def test_router_losses_change_only_the_update(tmp_path, key):
    """model.moe.aux_loss_coef / z_loss_coef reach the router's gradient."""
    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", tie=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    _sgd_step(0, 1, hf, ids, str(tmp_path / "off.pt"), {})
    _sgd_step(0, 1, hf, ids, str(tmp_path / "on.pt"), {key: 0.5})
    off, on = torch.load(tmp_path / "off.pt")["weights"], torch.load(tmp_path / "on.pt")["weights"]
    router = "model.layers.0.mlp.gate.weight"
    assert (off[router] - on[router]).abs().max().item() > 1e-6
