"""TP=2 and PP=2 (two gloo processes) give the same logits as TP=1."""
import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc


def _logits(hf_dir, tp, pp, ids, am, out_path):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.models.schedule import run_microbatches
    from megatron_rl.parallel import destroy_distributed, init_distributed, is_pp_last
    from megatron_rl.parallel.collectives import gather_vocab_parallel as gather_vocab_logits

    init_distributed(tp=tp, pp=pp)
    model = load_checkpoint(hf_dir, layer_spec="local")
    mbs = [{"input_ids": ids, "attention_mask": am}]
    with torch.no_grad():
        res = run_microbatches(model, mbs, lambda m, mb: gpt_forward(m, mb["input_ids"], mb["attention_mask"]),
                               lambda mb, out: (out.sum() * 0, {"logits": gather_vocab_logits(out)}),
                               forward_only=True)
    if is_pp_last() and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        torch.save(res[0]["logits"], out_path)
    destroy_distributed()


def _worker(rank, world, hf_dir, tp, pp, ids, am, out_path):
    _logits(hf_dir, tp, pp, ids, am, out_path)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_logits_match_tp1(tmp_path, tp, pp):
    hf = make_tiny_hf(tmp_path / "hf", "qwen2", tie=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    run_multiproc(_worker, 1, (hf, 1, 1, ids, am, str(tmp_path / "ref.pt")))
    run_multiproc(_worker, 2, (hf, tp, pp, ids, am, str(tmp_path / "par.pt")))
    ref, par = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "par.pt")
    assert ref.shape == par.shape == (2, 10, 96)
    assert (ref - par).abs().max().item() < 1e-5
