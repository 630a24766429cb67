"""`actor.max_tokens_per_microbatch > 0`: log-probs and the PPO/GSPO update on packed
token-budget micro-batches equal the padded micro-batches' (float32, 1e-5), at TP=1,
TP=2 and PP=2 (gloo)."""
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.trainer.microbatch import make_packed_microbatches
from tests.helpers import make_tiny_hf, run_multiproc

BUDGET = 48
# (ppo_kwargs, use_token_weights): token-mean with token weights on the mask and on pg
# (plus KL and entropy terms), and GSPO's sequence-level ratio with seq-mean-token-mean.
LOSSES = {
    "token-mean-mask-weights": (dict(loss_agg_mode="token-mean", token_weights_apply_to="mask"), True),
    "token-mean-pg-weights-kl-entropy": (dict(loss_agg_mode="token-mean", token_weights_apply_to="pg",
                                              use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01), True),
    "gspo-seq-mean-token-mean": (dict(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean"), False),
}


def ragged_batch(seed=0, vocab=96):
    """Rows of very different lengths: prompts of 2..8 real tokens (left-padded to 8),
    responses of 1..30 real tokens (right-padded to 30); 6 rows, 107 real tokens in a
    6 x 38 padded batch."""
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    p, r = 8, 30
    prompt_len, resp_len = [8, 2, 5, 3, 7, 4], [30, 1, 12, 3, 25, 7]
    b = len(prompt_len)
    prompt_mask = torch.zeros(b, p, dtype=torch.long)
    resp_mask = torch.zeros(b, r)
    for i in range(b):
        prompt_mask[i, p - prompt_len[i]:] = 1
        resp_mask[i, :resp_len[i]] = 1
    return Batch({"prompt_ids": torch.randint(1, vocab, (b, p), generator=g) * prompt_mask,
                  "prompt_mask": prompt_mask,
                  "response_ids": torch.randint(1, vocab, (b, r), generator=g) * resp_mask.long(),
                  "response_mask": resp_mask,
                  "advantages": torch.randn(b, r, generator=g) * resp_mask,
                  "old_logprob": (-torch.rand(b, r, generator=g) * 3 - 2) * resp_mask,
                  "ref_logprob": (-torch.rand(b, r, generator=g) * 3 - 2) * resp_mask,
                  "token_weights": (torch.rand(b, r, generator=g) * 2) * resp_mask},
                 [{"uid": str(i), "group": i // 2} for i in range(b)])


def _policy(hf, spec, budget, trained):
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import load_checkpoint
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    model = load_checkpoint(hf, layer_spec=spec)
    if not trained:
        return Policy(model, micro_batch_size=2, max_tokens_per_microbatch=budget)
    ddp = wrap_ddp(model, False)
    # Adam's first step is ~lr * sign(grad); eps 1e-3 keeps elements with ~0 gradient from
    # turning float32 rounding noise into full-size steps.
    optim = OptimConfig(lr=1e-3, eps=1e-3, clip_grad=1.0, distributed_optimizer=False)
    opt, sched = build_optimizer(ddp, optim, "float32", 10)
    return Policy(model, micro_batch_size=2, optimizer=opt, scheduler=sched, ddp_model=ddp,
                  max_tokens_per_microbatch=budget)


def _logprobs_worker(rank, world, hf, tp, pp, specs, out):
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp)
    batch = ragged_batch()
    res = {}
    for spec in specs:
        padded, packed = _policy(hf, spec, 0, False), _policy(hf, spec, BUDGET, False)
        res[spec] = (padded.compute_logprobs(batch, with_entropy=True),
                     packed.compute_logprobs(batch, with_entropy=True),
                     len(packed._train_microbatches(batch)))
    if torch.distributed.get_rank() == 0:
        torch.save(res, out)
    destroy_distributed()


def _update_worker(rank, world, hf, tp, pp, losses, out):
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.models import iter_hf_weights
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp)
    res = {}
    for name in losses:
        kwargs, weighted = LOSSES[name]
        batch = ragged_batch(seed=1)
        if not weighted:
            batch.tensors.pop("token_weights")
        both = []
        for budget in (0, BUDGET):
            policy = _policy(hf, "local", budget, True)
            before = {k: v.clone() for k, v in iter_hf_weights(policy.model)}
            metrics = policy.update(batch, AlgosConfig(**kwargs), mini_batch_size=0, ppo_epochs=1,
                                    use_ref=True, seed=0)
            delta = {k: v - before[k] for k, v in iter_hf_weights(policy.model)}
            both.append((metrics[0], delta))
        res[name] = both
    if torch.distributed.get_rank() == 0:
        torch.save(res, out)
    destroy_distributed()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("packed_training") / "hf", "llama", tie=False)


def _assert_logprobs_equal(res):
    mask = ragged_batch()["response_mask"].bool()
    for spec, ((lp0, ent0), (lp1, ent1), n_packed) in res.items():
        assert lp0.shape == lp1.shape == (6, 30)
        assert (lp0 - lp1).abs().max() < 1e-5, spec
        assert (ent0 - ent1)[mask].abs().max() < 1e-5, spec
        assert lp1[mask].abs().min() > 0.1 and (lp1[~mask] == 0).all()
        assert n_packed == 3, spec        # 107 real tokens, longest row 38, in 48-token micro-batches


def _assert_updates_equal(res):
    # pg_clipfrac / ppo_kl are per-micro-batch means weighted by loss shares: they depend on
    # how rows are grouped (as with micro_batch_size), so only the loss terms are compared.
    for name, ((m0, d0), (m1, d1)) in res.items():
        for k in ("pg_loss", "entropy", "grad_norm"):
            assert abs(m0[k] - m1[k]) < 1e-5, (name, k, m0[k], m1[k])
        assert m0["grad_norm"] > 0 and abs(m0["pg_loss"]) > 1e-3, name
        if "kl" in name:
            assert abs(m0["kl_loss"] - m1["kl_loss"]) < 1e-5 and m0["kl_loss"] > 0
        assert max(d.abs().max().item() for d in d0.values()) > 1e-4, name      # the step moved weights
        for k, d in d0.items():
            assert (d - d1[k]).abs().max() < 1e-5, (name, k)


@pytest.mark.multiproc
def test_packed_logprobs_equal_padded(hf, tmp_path):
    """local spec (block-diagonal mask) and sdpa spec (THD PackedSeqParams), TP=1."""
    run_multiproc(_logprobs_worker, 1, (hf, 1, 1, ("local", "sdpa"), str(tmp_path / "lp.pt")))
    _assert_logprobs_equal(torch.load(tmp_path / "lp.pt"))


@pytest.mark.multiproc
def test_packed_update_equals_padded(hf, tmp_path):
    run_multiproc(_update_worker, 1, (hf, 1, 1, tuple(LOSSES), str(tmp_path / "up.pt")))
    _assert_updates_equal(torch.load(tmp_path / "up.pt"))


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_packed_equals_padded_model_parallel(hf, tmp_path, tp, pp):
    """PP=2 pads every stream to the budget (one p2p shape); TP=2 splits the vocab."""
    run_multiproc(_logprobs_worker, 2, (hf, tp, pp, ("local",), str(tmp_path / "lp.pt")))
    _assert_logprobs_equal(torch.load(tmp_path / "lp.pt"))
    run_multiproc(_update_worker, 2, (hf, tp, pp, ("token-mean-mask-weights",), str(tmp_path / "up.pt")))
    _assert_updates_equal(torch.load(tmp_path / "up.pt"))


def test_budget_below_longest_row_is_an_error():
    with pytest.raises(ValueError, match=r"actor.max_tokens_per_microbatch=37 is smaller than row 0 "
                                         r"of the batch \(38 real"):
        make_packed_microbatches(ragged_batch(), 37)


def test_packed_microbatches_keep_budget_and_score_every_response_token():
    batch = ragged_batch()
    mbs = make_packed_microbatches(batch, BUDGET, pad_to=BUDGET)
    assert sorted(r for mb in mbs for r in mb["rows"].tolist()) == list(range(6))
    assert [mb["input_ids"].shape for mb in mbs] == [(1, BUDGET)] * 3
    assert all(mb["packed"].num_real_tokens <= BUDGET for mb in mbs)
    scored = torch.zeros(6, 30)
    for mb in mbs:
        rows = mb["rows"][mb["score_row"]]
        scored[rows, mb["score_col"]] += 1
        assert torch.equal(mb["score_labels"], batch["response_ids"][rows, mb["score_col"]])
    assert torch.equal(scored, batch["response_mask"])       # each response token scored exactly once
    assert all(mb["input_ids"].shape[1] % 8 == 0 for mb in make_packed_microbatches(batch, BUDGET,
                                                                                    pad_to_multiple_of=8))


@pytest.mark.parametrize("tp,pp,sp,expected", [(1, 1, False, (None, 1)), (2, 1, False, (None, 1)),
                                                (2, 1, True, (None, 2)), (1, 2, False, (50, 1)),
                                                (4, 2, True, (52, 4))])
def test_packed_stream_shape_follows_parallelism(tp, pp, sp, expected):
    """PP pads every stream to the budget; sequence parallelism aligns T to a multiple of tp."""
    from megatron_rl.trainer.policy import packed_shape

    assert packed_shape(50, tp=tp, pp=pp, sequence_parallel=sp) == expected
    pad_to, multiple = expected
    lengths = {mb["input_ids"].shape[1] for mb in make_packed_microbatches(ragged_batch(), 50, pad_to=pad_to,
                                                                           pad_to_multiple_of=multiple)}
    if pad_to:
        assert lengths == {pad_to}
    assert all(n % multiple == 0 for n in lengths)


def test_steered_actor_forward_refuses_packing():
    from megatron_rl.trainer.policy import Policy

    policy = Policy(SimpleNamespace(arch=SimpleNamespace(vocab_size=96, is_moe=False)), micro_batch_size=2,
                    max_tokens_per_microbatch=BUDGET)
    policy.steering = object()          # a steering controller that steers the actor's forwards
    with pytest.raises(ValueError, match="actor.max_tokens_per_microbatch > 0 .* steering.logprob_mode=rollout_is"):
        policy._train_microbatches(ragged_batch())


def test_train_loop_with_token_budget_matches_padded(tiny_run, tmp_path):
    """`actor.max_tokens_per_microbatch` reaches the actor (build.py): a packed run's losses
    equal the padded run's, and a budget below prompt + response fails at plan time naming the key."""
    import json

    from megatron_rl.trainer.main import train_main

    overrides, run_dir = tiny_run
    overrides = overrides + ["trainer.total_steps=2", "trainer.val_before_train=false"]
    rows = []
    for i, extra in enumerate(([], ["actor.max_tokens_per_microbatch=24"])):
        out = tmp_path / f"run{i}"
        assert train_main(None, overrides + extra + [f"logging.run_dir={out}"]) == 0
        rows.append([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2]
    for padded, packed in zip(*rows):
        for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "reward/mean"):
            assert abs(padded[k] - packed[k]) < 1e-5, (padded["step"], k)
    with pytest.raises(ValueError, match="actor.max_tokens_per_microbatch=8 is below the longest sample"):
        train_main(None, overrides + ["actor.max_tokens_per_microbatch=8", f"logging.run_dir={tmp_path / 'bad'}"])
