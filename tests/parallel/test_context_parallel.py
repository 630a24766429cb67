"""Context parallelism (`model.cp`): the shard/unshard index maths, the run plan's acceptances and
refusals, the memory estimate, and a tiny Llama on the sdpa spec at CP=2 (and CP=2 x TP=2,
CP=2 x PP=2) against CP=1, float32: logits, per-token log-probs and entropies, one PPO update's
loss, gradient norm and weight change, for padded rows (left padding) and packed THD
micro-batches; a critic's values and update; greedy native-engine rollouts; a GRPO run."""
import pytest
import torch

from megatron_rl.parallel.context_parallel import CPLayout, chunk_positions, thd_positions
from tests.helpers import fit_trainer, make_tiny_hf, run_multiproc
from tests.trainer.test_packed_training import ragged_batch

BUDGET = 48


# --- index maths ---------------------------------------------------------------------------

@pytest.mark.parametrize("cp", [1, 2, 4])
def test_chunks_cover_the_sequence_once_and_balance_causal_work(cp):
    s = 8 * cp
    parts = [chunk_positions(s, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(s))
    # rank r holds chunks r and 2cp-1-r: the causal work (sum of positions + 1) is equal on every rank
    work = {int((p + 1).sum()) for p in parts}
    assert len(work) == 1
    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7] and chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_sequence_not_a_multiple_of_2cp_is_refused():
    with pytest.raises(ValueError, match=r"sequence length 6 is not a multiple of 2 \* model.cp = 4"):
        chunk_positions(6, 2, 0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_layout_shard_then_gather_order_round_trips(layout):
    cp = 2
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)
    lays = ([CPLayout.padded(24, cp, r) for r in range(cp)] if layout == "padded"
            else [CPLayout.packed(cu, cp, r) for r in range(cp)])
    x = torch.randn(3, 24)
    gathered = torch.cat([lay.shard(x) for lay in lays], 1)      # what an all-gather over CP returns
    assert torch.equal(gathered, x[:, lays[0].gathered])
    inverse = torch.argsort(lays[0].gathered)
    assert torch.equal(gathered[:, inverse], x)


def test_thd_positions_split_every_segment_like_transformer_engine():
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert thd_positions(cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert thd_positions(cu, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]


def test_packing_pads_each_sequence_for_context_parallelism():
    from megatron_rl.models.packing import pack_sequences

    ids = torch.arange(1, 13).reshape(2, 6)
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    pk = pack_sequences(ids, am, seq_multiple=4, pad_to_multiple_of=4)
    assert pk.cu_seqlens.tolist() == [0, 4, 12]
    assert pk.input_ids[0].tolist() == [3, 4, 5, 6, 8, 9, 10, 11, 12, 0, 0, 0]
    assert pk.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    assert pk.rows.tolist() == [0] * 4 + [1] * 5 + [-1] * 3
    assert torch.equal(pk.unpack(pk.pack(ids.float())), ids.float() * am)


# --- the run plan -----------------------------------------------------------------------------

def _plan(*overrides, world_size=2, device="cpu", shape=None):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import resolve_plan

    cfg = load_experiment_config(None, ["data.train_batch_size=8", "rollout.n=4", *overrides])
    return resolve_plan(cfg, world_size=world_size, device=device, shape=shape)


@pytest.mark.parametrize("overrides,world,device", [
    (["model.cp=2"], 2, "cpu"),                                             # auto -> sdpa on cpu
    (["model.cp=2"], 2, "cuda"),                                            # auto -> sdpa on GPU too (padded)
    (["model.cp=2", "model.tp=2", "model.layer_spec=sdpa"], 8, "cpu"),
    (["model.cp=2", "model.layer_spec=te", "actor.max_tokens_per_microbatch=1024", "rollout.engine=vllm",
      "rollout.vllm.tensor_parallel_size=2"], 4, "cuda"),
    (["model.cp=2", "critic.enable=true", "algos.adv_estimator=gae"], 2, "cpu"),
    (["model.cp=2", "model.pp=2"], 4, "cpu"),
    (["model.cp=2", "model.pp=2", "model.vpp=2"], 4, "cpu"),
])
def test_plan_accepts_covered_context_parallel_layouts(overrides, world, device):
    p = _plan(*overrides, world_size=world, device=device, shape="smollm2-135m" if device == "cuda" else None)
    assert p.layout.cp == 2 and p.layout.dp == world // (2 * p.layout.tp * p.layout.pp)
    assert p.model.layer_spec_choice in ("sdpa", "te")
    if "model.layer_spec=te" not in overrides:
        assert p.model.layer_spec_choice == "sdpa"


@pytest.mark.parametrize("overrides,world,device,shape,match", [
    (["model.cp=2"], 2, "cpu", "qwen3-30b-a3b", r"model.cp=2: not covered for mixture-of-experts"),
    (["model.cp=2", "model.layer_spec=local"], 2, "cpu", None, r"model.layer_spec=local resolves to local"),
    (["model.cp=2", "model.layer_spec=te", "rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2"], 2,
     "cuda", None, r"layer spec te needs packed micro-batches"),
    (["model.cp=2", "model.layer_spec=te", "actor.max_tokens_per_microbatch=1024"], 2, "cuda", None,
     r"rollout.engine=native needs model.layer_spec=sdpa"),
    (["model.cp=2", "model.layer_spec=sdpa", "rollout.engine=vllm"], 2, "cuda", None,
     r"rollout.vllm.tensor_parallel_size=1 must be a multiple of model.tp \* model.cp = 2"),
    (["model.cp=2", "gad.enable=true"], 2, "cpu", None, r"model.cp=2 with gad.enable=true: not covered"),
    (["model.cp=3", "model.tp=1"], 4, "cpu", None, r"not divisible by model.tp \* model.pp \* model.cp"),
])
def test_plan_refuses_uncovered_context_parallel_by_key(overrides, world, device, shape, match):
    from megatron_rl.plan import PlanError

    with pytest.raises(PlanError, match=match):
        _plan(*overrides, world_size=world, device=device, shape=shape)


def test_memory_estimate_splits_per_token_terms_over_cp():
    from megatron_rl.plan import memory as mp

    base = dict(shape=mp.PRESETS["llama3-8b"], gpus=8, tp=2, micro_batch=1, seq_len=32768, dtype="bfloat16")
    one, two = mp.estimate(mp.PlanInputs(**base)), mp.estimate(mp.PlanInputs(**base, cp=2))
    s = mp.PRESETS["llama3-8b"]
    kv = 2 * 32768 * (s.num_heads // 2) * s.head_dim * 2 * s.num_layers       # gathered K/V, every layer held
    assert two.inputs.dp == 2 and one.inputs.dp == 4
    assert abs(two.components["activations"] - (one.components["activations"] / 2 + kv)) < 1e-6 * kv
    assert abs(two.components["logits + loss"] - one.components["logits + loss"] / 2) < 1.0
    assert two.components["optimizer"] == one.components["optimizer"]        # sharded over DP x CP = 4 both
    assert two.phases["train"] < one.phases["train"]
    assert "CP=2" in mp.layout(two.inputs)


# --- CP=2 against CP=1 (gloo) ----------------------------------------------------------------

def _policy(hf, budget):
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.trainer.build import build_optimizer
    from megatron_rl.trainer.ddp import wrap_ddp_chunks
    from megatron_rl.trainer.policy import Policy

    model = load_model_chunks(hf, layer_spec="sdpa")        # one chunk, or one per virtual stage (vpp)
    ddp = wrap_ddp_chunks(model, False)
    optim = OptimConfig(lr=1e-3, eps=1e-3, clip_grad=1.0, distributed_optimizer=False)
    opt, sched = build_optimizer(ddp, optim, "float32", 10)
    return Policy(model, micro_batch_size=3, optimizer=opt, scheduler=sched, ddp_model=ddp,
                  max_tokens_per_microbatch=budget)


def _greedy_rollout(hf, check_split: bool = True):
    """The native engine under CP decodes whole rows on every CP rank (`whole_sequences`); then
    the training forward is split again."""
    import types

    from megatron_rl.data.batch import Batch
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.parallel.context_parallel import cp_size
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams

    model = load_checkpoint(hf, layer_spec="sdpa")
    g = torch.Generator().manual_seed(3)
    prompt_mask = torch.ones(3, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompts = Batch({"prompt_ids": torch.randint(2, 96, (3, 5), generator=g), "prompt_mask": prompt_mask},
                    [{"uid": str(i)} for i in range(3)])
    engine = NativeEngine(model, types.SimpleNamespace(eos_token_id=1, pad_token_id=0))
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    with torch.no_grad():
        out = engine.generate(prompts, SamplingParams(max_new_tokens=6, greedy=True))
        if cp_size() > 1:      # no whole-sequence RoPE table may be served to the split forward later
            assert RotaryEmbedding.forward.cache_info().currsize == 0
        after = gpt_forward(model, prompts["prompt_ids"], prompt_mask).shape[1] if check_split else None
    return out["response_ids"], out["rollout_logprob"], after          # after: the split forward's length


def _critic_step(hf, batch):
    """A critic (trunk + value head, DDP, optimizer): its values, then one clipped value-loss
    update towards made-up returns: exercises the gathers' backward and DDP's DP x CP mean."""
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.models.value_head import attach_value_head
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.critic import Critic

    model = load_checkpoint(hf, layer_spec="sdpa")
    head = attach_value_head(model, seed=0)
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-3, eps=1e-3, clip_grad=1.0, distributed_optimizer=False),
                                 "float32", 10)
    critic = Critic(ddp, opt, sched, micro_batch_size=3)
    values = critic.compute_values(batch)
    batch = batch.select(range(len(batch)))
    batch["values"] = values
    batch["returns"] = values + torch.linspace(-1, 1, values.numel()).reshape(values.shape) * batch["response_mask"]
    before = {k: v.clone() for k, v in iter_hf_weights(model)} | {"head": head.weight.detach().clone()}
    metrics = critic.update(batch, AlgosConfig(), type("C", (), {"ppo_epochs": 1, "cliprange_value": 0.5})())
    delta = {k: v - before[k] for k, v in iter_hf_weights(model)} | {"head": head.weight.detach() - before["head"]}
    return values, metrics, delta


def _worker(rank, world, hf, tp, cp, out, pp=1, vpp=None):
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.models import iter_hf_weights
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.parallel.context_parallel import cp_size, gather_padded
    from megatron_rl.parallel.collectives import gather_vocab_parallel
    from megatron_rl.trainer.microbatch import model_inputs

    init_distributed(tp=tp, pp=pp, vpp=vpp, cp=cp)
    if cp > 1:           # CP ranks holding different rows are refused
        from megatron_rl.parallel.context_parallel import check_same_rows, cp_rank

        check_same_rows(torch.arange(6).reshape(2, 3), "rows")
        with pytest.raises(RuntimeError, match="the CP ranks of one data-parallel rank hold different rows"):
            check_same_rows(torch.arange(6).reshape(2, 3) + cp_rank(), "rows")
    res = {"cp": cp}
    batch = ragged_batch(seed=1)
    res["rollout"] = _greedy_rollout(hf, check_split=pp == 1) if not vpp else None
    ids, am = model_inputs(batch)
    if pp == 1:          # the value head lives on the last stage only
        res["critic"] = _critic_step(hf, batch)
    for budget in (0,) if vpp else (0, BUDGET):     # the interleaved schedule needs a fixed count: padded
        policy = _policy(hf, budget)
        if budget == 0 and pp == 1:      # whole logits of the padded batch (left-padded prompts)
            with torch.no_grad():
                logits = gather_vocab_parallel(gpt_forward(policy.model, ids, am))
                if cp_size() > 1:
                    logits = gather_padded(logits, ids.size(1))
            res["logits"] = logits * am[..., None]
        lp, ent = policy.compute_logprobs(batch, with_entropy=True)
        before = {k: v.clone() for k, v in iter_hf_weights(policy.chunks)}
        algos = AlgosConfig(loss_agg_mode="token-mean", use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)
        metrics = policy.update(batch, algos, mini_batch_size=0, ppo_epochs=1, use_ref=True, seed=0)
        delta = {k: v - before[k] for k, v in iter_hf_weights(policy.chunks)}
        res[budget] = (lp, ent, metrics[0], delta)
    if torch.distributed.get_rank() == 0:
        torch.save(res, out)
    destroy_distributed()


@pytest.fixture(scope="module")
def cp_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp")
    hf = make_tiny_hf(d / "hf", "llama", tie=False)
    run_multiproc(_worker, 1, (hf, 1, 1, str(d / "ref.pt")))
    return hf, torch.load(d / "ref.pt")


def _assert_matches(ref, got):
    mask = ragged_batch(seed=1)["response_mask"].bool()
    if got["rollout"] is not None:
        (ids0, rlp0, s0), (ids1, rlp1, s1) = ref["rollout"], got["rollout"]
        assert torch.equal(ids0, ids1) and (rlp0 - rlp1).abs().max() < 1e-5
        assert s0 == 5 and s1 in (None, 8 // got["cp"])      # the prompt (5 tokens, padded to 8) split again
    if "logits" in got:
        assert (ref["logits"] - got["logits"]).abs().max() < 1e-5
    if "critic" in got:
        (v0, c0, d0), (v1, c1, d1) = ref["critic"], got["critic"]
        assert (v0 - v1).abs().max() < 1e-5 and v0.abs().max() > 0.1
        for k in ("critic/vf_loss", "critic/grad_norm", "critic/values_mean"):
            assert abs(c0[k] - c1[k]) < 1e-5 * max(1.0, abs(c0[k])), (k, c0[k], c1[k])      # norm ~35
        assert c0["critic/grad_norm"] > 0 and d0["head"].abs().max() > 1e-4
        for k, d in d0.items():
            assert (d - d1[k]).abs().max() < 1e-5, k
    for budget in [b for b in (0, BUDGET) if b in got]:
        (lp0, ent0, m0, d0), (lp1, ent1, m1, d1) = ref[budget], got[budget]
        assert (lp0 - lp1).abs().max() < 1e-5, budget
        assert (ent0 - ent1)[mask].abs().max() < 1e-5, budget
        for k in ("pg_loss", "entropy", "kl_loss", "grad_norm"):
            assert abs(m0[k] - m1[k]) < 1e-5, (budget, k, m0[k], m1[k])
        assert m0["grad_norm"] > 0 and abs(m0["pg_loss"]) > 1e-3
        assert max(d.abs().max().item() for d in d0.values()) > 1e-4        # the step moved weights
        for k, d in d0.items():
            assert (d - d1[k]).abs().max() < 1e-5, (budget, k)


@pytest.mark.multiproc
def test_cp2_matches_cp1(cp_reference, tmp_path):
    hf, ref = cp_reference
    run_multiproc(_worker, 2, (hf, 1, 2, str(tmp_path / "cp2.pt")))
    _assert_matches(ref, torch.load(tmp_path / "cp2.pt"))


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (1, 2, 2)])
def test_cp2_with_tp2_or_pp2_matches_cp1(cp_reference, tmp_path, tp, pp, vpp):
    """Four gloo processes: the vocab split over TP inside each CP rank; or two pipeline stages
    (interleaved: two virtual stages each) whose p2p activations are each CP rank's share
    (log-probs, update; native rollouts without VPP)."""
    hf, ref = cp_reference
    run_multiproc(_worker, 4, (hf, tp, 2, str(tmp_path / "cp2.pt"), pp, vpp))
    _assert_matches(ref, torch.load(tmp_path / "cp2.pt"))


# --- end to end: `megatron-rl train` at CP=2 (native engine, sdpa) against CP=1 --------------------

VARIED_REWARD = '''
def varied(response, sample, **kw):
    """Varies within a group: by the response's words and the first one's length."""
    words = response.split()
    return 0.2 * len(words) + (0.1 * len(words[0]) if words else 0.0)
'''


def _train(rank, world, overrides):
    fit_trainer(overrides)


@pytest.mark.multiproc
def test_training_run_at_cp2_logs_cp1_metrics(tmp_path):
    """Two GRPO steps: the CP ranks' native engines decode the same rows, and the losses,
    gradient norms and rewards equal CP=1's; the CP=2 run checkpoints and resumes."""
    import json

    from megatron_rl.data.writers import write_jsonl
    from tests.trainer.conftest import write_tokenizer

    hf = make_tiny_hf(tmp_path / "model", "llama", tie=True)
    write_tokenizer(hf)
    qs = ["what is two plus two ?", "what is one plus three ?", "give the number four", "what is three plus one ?"]
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": qs[i % 4], "ground_truth": "4"} for i in range(8)])
    (tmp_path / "reward.py").write_text(VARIED_REWARD)
    base = [f"model.path={hf}", "model.layer_spec=sdpa", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
            "data.train_batch_size=2", "data.max_prompt_length=16", "rollout.n=4", "rollout.max_new_tokens=5",
            "actor.micro_batch_size=2", "actor.optim.lr=1e-3", "reward.name=varied",
            f"reward.custom_functions={{varied: '{tmp_path / 'reward.py'}:varied'}}", "reward.num_workers=0",
            "logging.sinks=[jsonl]", "trainer.total_steps=2", "trainer.seed=3", "trainer.deterministic=true",
            "trainer.val_every=0", "trainer.val_before_train=false"]
    runs = {}
    for cp, world, save in ((1, 1, ["trainer.save_final=false"]), (2, 2, ["trainer.save_every=1"])):
        run_dir = tmp_path / f"run_cp{cp}"
        run_multiproc(_train, world, (base + save + [f"model.cp={cp}", f"logging.run_dir={run_dir}"],))
        runs[cp] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    # resume the CP=2 run from its step-1 checkpoint (as if it died after step 1): step 2 again
    import shutil

    ckpt = tmp_path / "run_cp2" / "checkpoints"
    shutil.rmtree(ckpt / "step_000002")
    (ckpt / "latest").write_text("step_000001")
    (tmp_path / "run_cp2" / "metrics.jsonl").unlink()
    run_multiproc(_train, 2, (base + ["model.cp=2", f"logging.run_dir={tmp_path / 'run_cp2'}"],))
    resumed = [json.loads(x) for x in (tmp_path / "run_cp2" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [m["step"] for m in resumed if "actor/pg_loss" in m] == [2]
    assert abs(resumed[-1]["actor/pg_loss"] - runs[2][-1]["actor/pg_loss"]) < 1e-5
    steps = {cp: [m for m in rows if "actor/pg_loss" in m] for cp, rows in runs.items()}
    assert len(steps[1]) == len(steps[2]) == 2
    for m1, m2 in zip(steps[1], steps[2]):
        assert m1["actor/grad_norm"] > 1e-3 and m1["reward/std"] > 0       # a real update, varied rewards
        for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "reward/mean", "response_length/mean"):
            assert abs(m1[k] - m2[k]) < 1e-5, (k, m1[k], m2[k])
