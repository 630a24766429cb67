"""Partial rollouts in the native engine: a generation stopped after a budget of decode steps (or by
an interrupt), the weights updated, and resumed carries both policy versions' tags, and each token's
rollout log-prob equals a full-sequence recompute under the weights of the version that sampled it
(float32, < 1e-5); with no stop the result is plain generate's exactly; also at TP=2 and PP=2."""
import types

import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.partial import PartialRollout, oldest_policy_version
from megatron_rl.rollout.protocol import SamplingParams
from tests.helpers import make_tiny_hf, run_multiproc

TOK = types.SimpleNamespace(eos_token_id=1, pad_token_id=0)
SP = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=5)
KEYS = ("response_ids", "response_mask", "rollout_logprob", "policy_version", "prompt_ids")


def prompts(n=3):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, :1] = 0
    return Batch({"prompt_ids": torch.randint(2, 90, (n, 5), generator=g) * mask, "prompt_mask": mask},
                 [{"uid": str(i)} for i in range(n)])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("partial")
    return make_tiny_hf(d / "v0", "llama", seed=0), make_tiny_hf(d / "v1", "llama", seed=1)


@pytest.fixture(scope="module")
def models(ckpts):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed

    init_distributed(tp=1, pp=1)
    return [load_checkpoint(h, layer_spec="local") for h in ckpts]


def make_engine(hf, **kw):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.rollout.native_engine import NativeEngine

    return NativeEngine(load_checkpoint(hf, layer_spec="local"), TOK, **kw)


def to_v1(engine, v1_model):
    from megatron_rl.models import iter_hf_weights

    engine.update_weights(iter_hf_weights(v1_model))
    engine.policy_version = 1


@torch.no_grad()
def recomputed_logprobs(model, batch: Batch) -> torch.Tensor:
    """[B, R] log-probs of the response tokens from one forward over prompt ++ response."""
    from megatron_rl.models.forward import causal_padding_mask, position_ids_from_mask

    ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["response_attention_mask"]], 1)
    model.eval()
    logits = model(ids, position_ids_from_mask(am), causal_padding_mask(am)).float()   # the trainer's positions
    p, r = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    lp = torch.log_softmax(logits[:, p - 1: p + r - 1], -1)
    return lp.gather(-1, batch["response_ids"][..., None])[..., 0] * batch["response_mask"]


def check_versions_and_logprobs(out: Batch, stop_at: int, models) -> None:
    """Tokens before `stop_at` are v0 and after are v1 (rows of a chunk stopped there; rows of a
    chunk started after the stop are all v1); each log-prob is its version's recompute."""
    v, mask = out["policy_version"], out["response_mask"] > 0
    assert ((v >= 0) == mask).all() and (v[~mask] == -1).all()
    assert set(v[mask].tolist()) == {0, 1}
    lp0, lp1 = recomputed_logprobs(models[0], out), recomputed_logprobs(models[1], out)
    want = torch.where(v == 0, lp0, lp1)
    diff = ((out["rollout_logprob"] - want) * mask).abs().max().item()
    assert diff < 1e-5, diff
    wrong = torch.where(v == 0, lp1, lp0)                   # the other version's: far off (the check bites)
    assert ((out["rollout_logprob"] - wrong) * mask).abs().max().item() > 0.1
    return v


def test_no_stop_equals_plain_generate_exactly(ckpts, models):
    engine = make_engine(ckpts[0], max_batch_size=4)
    plain = engine.generate(prompts(), SP)
    assert (plain["policy_version"][plain["response_mask"] > 0] == 0).all()
    for kw in (dict(budget=2 * SP.max_new_tokens), dict(interrupt=lambda: False)):   # 2 chunks
        out = engine.generate(prompts(), SP, **kw)
        assert isinstance(out, Batch), kw
        for k in KEYS:
            assert torch.equal(out[k], plain[k]), (kw, k)


def test_resumed_after_weight_update_carries_both_versions_and_their_logprobs(ckpts, models):
    engine = make_engine(ckpts[0], max_batch_size=4)       # 6 rows: chunk 0 stops, chunk 1 starts at v1
    part = engine.generate(prompts(), SP, budget=3)
    assert isinstance(part, PartialRollout) and part.current.steps == 3 and len(part.pending) == 1
    assert part.rows == 6 and part.unfinished_rows >= 2
    to_v1(engine, models[1])
    out = engine.resume(part, SP)
    assert isinstance(out, Batch) and len(out) == 6
    assert [s["group"] for s in out.samples] == ["0", "0", "1", "1", "2", "2"]
    v = check_versions_and_logprobs(out, 3, models)
    first = v[:4]
    mask = out["response_mask"][:4] > 0
    assert (first[:, :3][mask[:, :3]] == 0).all() and (first[:, 3:][mask[:, 3:]] == 1).all()
    assert (v[4:][out["response_mask"][4:] > 0] == 1).all()
    assert (out["response_mask"][:4, 3:].sum() > 0)                 # some row really went on under v1
    assert oldest_policy_version(out).tolist()[4:] == [1, 1] and oldest_policy_version(out)[0] == 0


def test_interrupt_without_weight_update_continues_the_same_draws(ckpts, models):
    engine = make_engine(ckpts[0])
    plain = engine.generate(prompts(), SP)
    calls = []
    part = engine.generate(prompts(), SP, interrupt=lambda: calls.append(1) or len(calls) >= 2)
    assert isinstance(part, PartialRollout) and part.current.steps == 2
    out = engine.resume(part)
    assert torch.equal(out["response_ids"], plain["response_ids"])
    assert (out["rollout_logprob"] - plain["rollout_logprob"]).abs().max() < 1e-5


def test_bad_budget_and_changed_sampling_are_refused(ckpts, models):
    engine = make_engine(ckpts[0])
    with pytest.raises(ValueError, match="budget must be >= 1"):
        engine.generate(prompts(), SP, budget=0)
    part = engine.generate(prompts(), SP, budget=1)
    with pytest.raises(ValueError, match="differs from the partial rollout"):
        engine.resume(part, SamplingParams(n=2, max_new_tokens=8, seed=6))


def _parallel_proc(rank, world, hf0, hf1, tp, pp, out_path):
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine

    init_distributed(tp=tp, pp=pp)
    engine = NativeEngine(load_checkpoint(hf0, layer_spec="local"), TOK)
    v1 = load_checkpoint(hf1, layer_spec="local")
    plain = engine.generate(prompts(), SP)
    same = engine.generate(prompts(), SP, interrupt=lambda: False)
    steps = []
    # only the last rank asks to stop: the group agrees, every rank stops at the same step
    part = engine.generate(prompts(), SP, interrupt=lambda: steps.append(1) or (rank == world - 1 and len(steps) >= 3))
    assert isinstance(part, PartialRollout) and part.current.steps == 3, part
    engine.update_weights(iter_hf_weights(v1))
    engine.policy_version = 1
    out = engine.resume(part, SP)
    if rank == 0:
        torch.save({"plain": plain.tensors, "same": same.tensors, "out": out.tensors}, out_path)
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_partial_rollout_at_tp2_and_pp2(ckpts, models, tmp_path, tp, pp):
    path = str(tmp_path / "out.pt")
    run_multiproc(_parallel_proc, 2, (*ckpts, tp, pp, path))
    res = torch.load(path)
    for k in KEYS:
        assert torch.equal(res["same"][k], res["plain"][k]), k
    out = Batch(res["out"], [{} for _ in range(len(res["out"]["prompt_ids"]))])
    v = check_versions_and_logprobs(out, 3, models)
    mask = out["response_mask"] > 0
    assert (v[:, :3][mask[:, :3]] == 0).all() and (v[:, 3:][mask[:, 3:]] == 1).all()
