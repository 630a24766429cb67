"""model.freeze_vision through Megatron DDP and optimizer at TP=2: frozen, the tower is
unchanged by an update; trained, it changes and stays identical on both TP ranks (its
gradients are the same on every TP rank: the features enter a replicated embedding)."""
import pytest
import torch

from tests.helpers import run_multiproc
from tests.models.vl_fixtures import processed_batch, tiny_qwen2_5_vl


def _one_update(rank, world, hf_dir, enc, freeze):
    import torch.distributed as dist

    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.data.multimodal import ImageBatch
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.models.vl.forward import vl_forward
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.collectives import gather_vocab_parallel
    from megatron_rl.trainer.build import build_optimizer
    from megatron_rl.trainer.ddp import wrap_ddp_chunks

    init_distributed(tp=2)
    chunks = load_model_chunks(hf_dir, freeze_vision=freeze)
    before = {n: p.detach().clone() for n, p in chunks[0].visual.named_parameters()}
    ddp = wrap_ddp_chunks(chunks, use_dist_opt=False)
    opt, _ = build_optimizer(ddp, OptimConfig(lr=1e-2), "float32", 1)
    for d in ddp:
        d.zero_grad_buffer()
    opt.zero_grad()
    logits = gather_vocab_parallel(vl_forward(ddp[0], enc["input_ids"], enc["attention_mask"],
                                              ImageBatch(enc["pixel_values"], enc["image_grid_thw"])))
    loss = logits.float().log_softmax(-1)[..., 5].mean()
    loss.backward()
    for d in ddp:
        d.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in chunks[0].visual.named_parameters())
    assert (moved == 0.0) if freeze else (moved > 1e-4), moved
    for n, p in chunks[0].visual.named_parameters():       # replicated over TP after the step
        other = [torch.empty_like(p) for _ in range(2)]
        dist.all_gather(other, p.detach().contiguous())
        assert torch.equal(other[0], other[1]), n
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("freeze", [True, False])
def test_vision_tower_trains_only_unfrozen_and_stays_replicated_over_tp(tmp_path, freeze):
    hf = tiny_qwen2_5_vl(tmp_path / "hf")
    run_multiproc(_one_update, 2, (hf, processed_batch(hf), freeze))
