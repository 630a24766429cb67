"""`trainer.async.partial_rollout` at the worker level (trainer rank 0's client + one rollout rank over
the real bridge, gloo): a weight push queued while the engine generates interrupts it between two
decode steps, the worker takes the push and resumes; the result carries both versions' tags per
token, each token's log-prob equals a recompute under the version that sampled it, and the
trainer's buffer counts a sample's staleness from its oldest token; also with two rollout ranks
(engine TP=2), which must stop at the same step and take the push together."""
import types

import pytest
import torch

from megatron_rl.async_rl import codec
from megatron_rl.async_rl.pipeline import RolloutPipeline
from megatron_rl.rollout.protocol import SamplingParams
from tests.async_rl.workers import PAUSE_AT, partial_pair
from tests.helpers import make_tiny_hf, run_multiproc

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(120)]
SP = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("partial_async")
    return make_tiny_hf(d / "v0", "llama", seed=0), make_tiny_hf(d / "v1", "llama", seed=1)


def run_pair(ckpts, out_dir, world: int):
    out = str(out_dir / f"result{world}.pt")
    run_multiproc(partial_pair, world, (*ckpts, SP, out))
    return codec.load(out), torch.load(out + ".lp")


@pytest.fixture(scope="module")
def result(ckpts, tmp_path_factory):
    return run_pair(ckpts, tmp_path_factory.mktemp("pair"), 2)


def check_tags_and_logprobs(res, lp) -> None:
    out, v, mask = res.batch, res.batch["policy_version"], res.batch["response_mask"] > 0
    assert (v[:, :PAUSE_AT] == 0).all() and (v[:, PAUSE_AT:] == 1).all()     # both versions, per token
    want = torch.where(v == 0, lp["lp0"], lp["lp1"])
    assert ((out["rollout_logprob"] - want) * mask).abs().max().item() < 1e-5
    wrong = torch.where(v == 0, lp["lp1"], lp["lp0"])                        # the other version's: far off
    assert ((out["rollout_logprob"] - wrong) * mask).abs().max().item() > 0.1


def test_a_push_mid_generation_interrupts_and_resumes_under_the_new_version(result):
    res, lp = result
    assert (res.request_id, res.chunk, res.chunks, res.version, res.interrupts) == (1, 0, 1, 1, 1)
    assert lp["buckets"] > 1                                         # the push really was several buckets
    out = res.batch
    assert len(out) == 6 and out["response_mask"].sum() == 6 * SP.max_new_tokens
    v = out["policy_version"]
    assert (v[:, :PAUSE_AT] == 0).all() and (v[:, PAUSE_AT:] == 1).all()     # both versions, per token
    assert [s["policy_version"] for s in out.samples] == [0] * 6             # a sample's record: its oldest
    assert [s["score"] for s in out.samples] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2]   # records came back exact


def test_each_token_logprob_is_its_sampling_versions_recompute(result):
    check_tags_and_logprobs(*result)


@pytest.mark.slow   # the one-rollout-rank partial tests stay in CI
def test_two_rollout_ranks_at_tp2_stop_and_take_the_push_together(ckpts, tmp_path):
    res, lp = run_pair(ckpts, tmp_path, 3)          # trainer rank 0 + rollout ranks 1, 2 (engine TP=2)
    assert (res.version, res.interrupts) == (1, 1)
    check_tags_and_logprobs(res, lp)


def test_buffer_staleness_counts_from_the_oldest_token(result, tmp_path):
    res, _ = result
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(train_batch_size=3, pad_id=0),
                                trainer=types.SimpleNamespace(async_=types.SimpleNamespace(request_prompts=0,
                                                                                           partial_rollout=True),
                                                              total_steps=0),
                                logging=types.SimpleNamespace(run_dir=str(tmp_path)))
    plan = types.SimpleNamespace(rollout=types.SimpleNamespace(max_staleness=1, async_mode="fully_async"))
    pipe = RolloutPipeline(cfg, plan, cfg.data, client=None, sampling_fn=None)
    pipe.pending[1] = 3
    pipe.receive(res)
    assert [g.version for g in pipe.buffer] == [0, 0, 0] and not pipe.pending
    batch, m = pipe._take_on_rank0(step=2)                   # the update starts from version 1
    assert (m["async/staleness_mean"], m["async/staleness_max"], m["async/interrupts"]) == (1.0, 1.0, 1.0)
    assert m["async/token_staleness_mean"] == PAUSE_AT / SP.max_new_tokens      # only the v0 tokens lag
    assert len(batch) == 6 and (batch["policy_version"] == res.batch["policy_version"]).all()
