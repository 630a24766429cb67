"""Virtual pipeline parallelism (`model.vpp`, Megatron's interleaved 1F1B) on an 8-layer
tiny Llama: PP=2 x VPP=2 (two gloo processes, four chunks of two layers) against one
process at PP=1, for log-probs, the PPO loss, the grad norm and the updated weights, the
weight stream, greedy generation of the native engine, and dist-checkpoints saved at one
layout and loaded at the other.

The three runs (PP1, PP2xVPP2, PP1 again loading the PP2xVPP2 checkpoint) happen once per
module; each test asserts one behaviour on their saved results.
"""
import types

import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc
from tests.trainer.test_parallel_update import synthetic_batch

def _greedy(chunks):
    from megatron_rl.data.batch import Batch
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompt_mask = torch.ones(3, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompts = Batch({"prompt_ids": torch.randint(2, 96, (3, 5), generator=g), "prompt_mask": prompt_mask},
                    [{"uid": str(i)} for i in range(3)])
    engine = NativeEngine(chunks, types.SimpleNamespace(eos_token_id=1, pad_token_id=0))
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, greedy=True))
    return out["response_ids"], out["rollout_logprob"]


def _stream(chunks) -> dict:
    """The HF weight stream, copied (locally owned tensors may be views of the parameters)."""
    from megatron_rl.models.loading import iter_hf_weights

    return {k: v.clone() for k, v in iter_hf_weights(chunks)}


def _run(rank, world, src, pp, vpp, out, save_to, load_from):
    """Load `src`, then: log-probs, greedy tokens, weight stream, one PPO step, the updated
    weights and log-probs; save the updated model to `save_to`; optionally load `load_from`
    into fresh chunks and report its weights and log-probs."""
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models.loading import load_model_chunks, save_mcore_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.trainer.build import build_optimizer
    from megatron_rl.trainer.ddp import wrap_ddp_chunks
    from megatron_rl.trainer.policy import Policy

    init_distributed(tp=1, pp=pp, vpp=vpp)
    chunks = load_model_chunks(src, layer_spec="local")
    assert len(chunks) == (vpp or 1)
    res = {"layers": [[layer.layer_number for layer in c.decoder.layers] for c in chunks]}
    batch = synthetic_batch()
    res["tokens"], res["gen_logprob"] = _greedy(chunks)
    res["weights_before"] = _stream(chunks)
    ddp = wrap_ddp_chunks(chunks, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0, distributed_optimizer=False), "float32", 10)
    # 4 micro-batches: past warm-up into the interleaved steady state, where both neighbours
    # exchange activations and gradients at once (batched p2p paired them crosswise at PP=2)
    policy = Policy(chunks, micro_batch_size=1, optimizer=opt, scheduler=sched, ddp_model=ddp)
    res["logprob"], _ = policy.compute_logprobs(batch)
    res["metrics"] = policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    res["weights"] = _stream(chunks)
    res["logprob_after"], _ = policy.compute_logprobs(batch)
    if save_to:
        save_mcore_checkpoint(chunks, save_to)
    if load_from:
        loaded = load_model_chunks(load_from, layer_spec="local")
        res["loaded_weights"] = _stream(loaded)
        res["loaded_logprob"], _ = Policy(loaded, micro_batch_size=2).compute_logprobs(batch)
    if torch.distributed.get_rank() == 0:
        torch.save(res, out)
    destroy_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vpp")
    hf = make_tiny_hf(d / "hf", "llama", tie=True, num_hidden_layers=8)
    run_multiproc(_run, 1, (hf, 1, None, str(d / "pp1.pt"), str(d / "ck_pp1"), None))
    run_multiproc(_run, 2, (hf, 2, 2, str(d / "vpp.pt"), str(d / "ck_vpp"), str(d / "ck_pp1")))
    run_multiproc(_run, 1, (str(d / "ck_vpp"), 1, None, str(d / "pp1_from_vpp.pt"), None, None))
    return {k: torch.load(d / f"{k}.pt") for k in ("pp1", "vpp", "pp1_from_vpp")}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.multiproc
def test_vpp_chunks_hold_interleaved_global_layers(runs):
    # rank 0 of PP2 x VPP2: virtual stages 0 and 2 of 4 (layer_number is 1-based)
    assert runs["vpp"]["layers"] == [[1, 2], [5, 6]]
    assert runs["pp1"]["layers"] == [list(range(1, 9))]


@pytest.mark.multiproc
def test_vpp_weight_stream_equals_pp1(runs):
    assert _max_diff(runs["pp1"]["weights_before"], runs["vpp"]["weights_before"]) == 0.0


@pytest.mark.multiproc
def test_vpp_logprobs_loss_and_grad_norm_equal_pp1(runs):
    ref, par = runs["pp1"], runs["vpp"]
    assert (ref["logprob"] - par["logprob"]).abs().max() < 1e-5
    for k in ("pg_loss", "grad_norm", "pg_clipfrac"):
        assert abs(ref["metrics"][0][k] - par["metrics"][0][k]) < 1e-5, k
    assert ref["metrics"][0]["grad_norm"] > 0


@pytest.mark.multiproc
def test_vpp_parameters_after_one_step_equal_pp1(runs):
    # as in test_parallel_update: Adam may move ~0-gradient elements by a fraction of lr
    ref, par = runs["pp1"]["weights"], runs["vpp"]["weights"]
    for name, w in ref.items():
        d = (w - par[name]).abs()
        assert d.max() < 5e-5 and d.mean() < 1e-6, name
    assert (runs["pp1"]["logprob_after"] - runs["vpp"]["logprob_after"]).abs().max() < 1e-5


@pytest.mark.multiproc
def test_vpp_native_engine_greedy_tokens_equal_pp1(runs):
    assert torch.equal(runs["pp1"]["tokens"], runs["vpp"]["tokens"])
    assert (runs["pp1"]["gen_logprob"] - runs["vpp"]["gen_logprob"]).abs().max() < 1e-5


@pytest.mark.multiproc
def test_vpp_checkpoint_loads_at_pp1(runs):
    saved, loaded = runs["vpp"], runs["pp1_from_vpp"]
    assert _max_diff(saved["weights"], loaded["weights_before"]) == 0.0
    # log-probs of the loaded model (before its own update) = the saver's after its update
    assert (saved["logprob_after"] - loaded["logprob"]).abs().max() < 1e-5


@pytest.mark.multiproc
def test_pp1_checkpoint_loads_at_vpp(runs):
    saved, loaded = runs["pp1"], runs["vpp"]
    assert _max_diff(saved["weights"], loaded["loaded_weights"]) == 0.0
    assert (saved["logprob_after"] - loaded["loaded_logprob"]).abs().max() < 1e-5


def test_vpp_layouts_megatron_cannot_run_are_refused_by_key():
    from megatron_rl.models.provider import check_vpp_layout
    from megatron_rl.models.schedule import check_interleaved_microbatches

    with pytest.raises(ValueError, match=r"model.vpp=2 needs model.pp > 1"):
        check_vpp_layout(8, 1, 2)
    with pytest.raises(ValueError, match=r"num_hidden_layers=8 is not divisible by model.pp\*model.vpp = 2\*3"):
        check_vpp_layout(8, 2, 3)
    check_vpp_layout(8, 2, 2)
    check_vpp_layout(8, 1, None)
    with pytest.raises(ValueError, match=r"number of micro-batches \(3\) to be a multiple of model.pp=2.*"
                                         r"actor.micro_batch_size"):
        check_interleaved_microbatches(3, 2, 2)
    check_interleaved_microbatches(4, 2, 2)
    check_interleaved_microbatches(3, 1, 2)      # no interleaving: any count
