"""Expert parallelism (two gloo processes, DP=2 x EP=2): each rank loads only its
experts; logits equal transformers' (= EP=1); the HF export stream gathers every
expert back bit for bit; a dist-checkpoint saved at EP=2 loads at EP=1."""
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_tiny_hf, run_multiproc


def _ep_worker(rank, world, hf_dir, ids, am, ckpt_dir, out):
    import transformers
    from megatron_rl.models import iter_hf_weights, load_checkpoint, save_mcore_checkpoint
    from megatron_rl.models.forward import gpt_forward, position_ids_from_mask
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1, ep=2)
    model = load_checkpoint(hf_dir, layer_spec="local").eval()
    experts = [n for n, _ in model.named_parameters() if "local_experts" in n and "layers.0." in n]
    assert len(experts) == 2 * 2, experts          # 2 of 4 experts, fc1 + fc2 each
    # Different tokens per rank: the alltoall really exchanges them.
    mine_ids, mine_am = ids[rank::2], am[rank::2]
    with torch.no_grad():
        got = gpt_forward(model, mine_ids, mine_am)[..., :96]
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(
            input_ids=mine_ids, attention_mask=mine_am, position_ids=position_ids_from_mask(mine_am)).logits
    keep = mine_am.bool()
    assert (got[keep] - ref[keep]).abs().max().item() < 1e-4
    exported = dict(iter_hf_weights(model))
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
