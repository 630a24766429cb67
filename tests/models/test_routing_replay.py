"""MoE routing replay (`model.moe.routing_replay`): the native engine records each fed token's
top-k experts (prefill + decode), the actor's log-prob recompute and update force them
(Megatron's RouterReplay), and the rollout/training log-prob gap drops when the engine's
router differs from the trainer's (here: the engine's router weights perturbed, as a
numerics gap between engine and trainer would). EP=1 in-process, DP=2 x EP=2 over gloo."""
import types

import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc

ROWS, NEW = 6, 10


def _prompts(rows=range(ROWS)):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 90, (ROWS, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[4, :3] = 0
    rows = list(rows)
    return ids[rows], mask[rows], rows


def _models(hf, perturb: float):
    """(trainer model, engine model): same checkpoint, the engine's router weights perturbed."""
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.moe_config import MoEConfig

    moe = MoEConfig(routing_replay=True)
    actor, engine_model = (load_checkpoint(hf, layer_spec="local", moe=moe) for _ in range(2))
    with torch.no_grad():       # element-wise pseudo-noise: the same on any PP/EP layout
        for n, p in engine_model.named_parameters():
            if "router" in n:
                p.add_(torch.sin(p * 1e4) * perturb * p.std())
    return actor, engine_model


def _rollout(engine_model, rows=range(ROWS)):
    from megatron_rl.data.batch import Batch
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams

    engine = NativeEngine(engine_model, types.SimpleNamespace(eos_token_id=95, pad_token_id=0))
    ids, mask, rows = _prompts(rows)
    batch = Batch({"prompt_ids": ids, "prompt_mask": mask}, [{"uid": str(i)} for i in rows])
    return engine.generate(batch, SamplingParams(n=1, max_new_tokens=NEW, temperature=1.0, seed=3))


def _logprob_gap(policy, batch) -> tuple[float, dict]:
    lp, _ = policy.compute_logprobs(batch)
    m = batch["response_mask"]
    gap = float(((lp - batch["rollout_logprob"]).abs() * m).sum() / m.sum())
    return gap, ({} if policy.routing_replay is None else policy.routing_replay.collect())


def _replay_case(hf, perturb, rows=range(ROWS)):
    from megatron_rl.trainer.policy import Policy

    actor, engine_model = _models(hf, perturb)
    batch = _rollout(engine_model, rows)
    on, off = Policy(actor, micro_batch_size=2, routing_replay=True), Policy(actor, micro_batch_size=2)
    gap_on, metrics = _logprob_gap(on, batch)
    gap_off, _ = _logprob_gap(off, batch)
    return batch, gap_on, gap_off, metrics


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from megatron_rl.parallel import init_distributed
    init_distributed()
    return make_tiny_hf(tmp_path_factory.mktemp("rr") / "hf", "qwen3_moe", tie=False)


def test_engine_records_every_fed_token_and_replay_is_exact_without_a_gap(hf):
    batch, gap_on, gap_off, metrics = _replay_case(hf, perturb=0.0)
    prompt, resp = batch["prompt_routed_experts"], batch["response_routed_experts"]
    assert prompt.shape == (ROWS, 6, 3, 2) and resp.shape[2:] == (3, 2)   # 3 MoE layers (layer 1 dense), top-2
    assert bool((prompt[batch["prompt_mask"] == 0] == 0).all())           # left padding: not recorded
    assert bool((prompt[batch["prompt_mask"] > 0] > 0).all())
    lengths = batch["response_mask"].sum(-1).long()
    width = resp.shape[1]             # the last decode step's token is never fed (nothing follows it)
    for i, n in enumerate(lengths.tolist()):
        fed = resp[i, : min(n, width - 1)]
        assert bool((fed > 0).all()) and bool((resp[i, min(n, width - 1):] == 0).all()), i
        assert bool((fed[..., 0] != fed[..., 1]).all())                      # two distinct experts
    assert metrics == {"moe/replay_mismatch_frac": 0.0, "moe/replay_agree_frac": 1.0}
    assert gap_on < 1e-5 and gap_off < 1e-5


def test_replay_forces_the_recorded_experts_and_cuts_the_logprob_gap(hf):
    from megatron_rl.trainer.policy import Policy

    batch, gap_on, gap_off, metrics = _replay_case(hf, perturb=0.03)
    assert metrics["moe/replay_agree_frac"] == 1.0                # 100% of recorded tokens
    assert metrics["moe/replay_mismatch_frac"] > 0.02             # the perturbation flips routing
    assert gap_on < gap_off / 5, (gap_on, gap_off)
    # packed micro-batches replay the same experts: the same log-probs as padded ones
    actor = _models(hf, 0.0)[0]
    padded = Policy(actor, micro_batch_size=2, routing_replay=True).compute_logprobs(batch)[0]
    packed_policy = Policy(actor, micro_batch_size=2, routing_replay=True, max_tokens_per_microbatch=40)
    packed = packed_policy.compute_logprobs(batch)[0]
    assert (packed - padded).abs().max().item() < 1e-5
    assert packed_policy.routing_replay.collect()["moe/replay_agree_frac"] == 1.0


def test_recompute_records_when_the_engine_did_not_and_the_update_replays(hf):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.trainer.ddp import wrap_ddp_chunks
    from megatron_rl.trainer.policy import Policy

    actor, engine_model = _models(hf, 0.03)
    batch = _rollout(engine_model)
    engine_ids = batch["response_routed_experts"].clone()
    del batch.tensors["prompt_routed_experts"], batch.tensors["response_routed_experts"]   # as from vLLM
    ddp = wrap_ddp_chunks(actor, use_dist_opt=False)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=0.1, clip_grad=1.0), ddp)
    policy = Policy(actor, micro_batch_size=2, optimizer=opt, ddp_model=ddp, routing_replay=True)
    old, _ = policy.compute_logprobs(batch)                       # records the trainer's own routing
    assert policy.routing_replay.collect() == {}                  # a recording pass measures nothing
    recorded = batch["response_routed_experts"]
    fed = engine_ids > 0
    assert 0 < int((recorded[fed] != engine_ids[fed]).sum())      # trainer's routing, not the engine's
    batch["old_logprob"] = old
    batch["advantages"] = torch.randn(batch["response_mask"].shape, generator=torch.Generator().manual_seed(0))
    steps = policy.update(batch, AlgosConfig(), mini_batch_size=ROWS, ppo_epochs=2, use_ref=False, seed=0)
    assert len(steps) == 2 and all(s["update_ok"] for s in steps)
    update = policy.routing_replay.collect("update")
    assert update["moe/replay_update_agree_frac"] == 1.0          # the update forwards used the recording


def test_routing_replay_is_refused_by_name_where_it_cannot_work():
    from megatron_rl.config.schema import Config
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.models.routing_replay import replay_conflicts
    from megatron_rl.plan.layout import PlanError, check_no_moe_options

    cfg = Config()
    cfg.model.moe.routing_replay = True
    assert replay_conflicts(cfg) is None
    for key, value in [("sequence_parallel", True), ("recompute", "full")]:
        c = Config()
        c.model.moe.routing_replay, c.model.tp = True, 2
        setattr(c.model, key, value)
        assert f"model.{key}" in replay_conflicts(c)
    c = Config()
    c.model.moe.routing_replay, c.rollout.engine, c.rollout.logprob_mode = True, "vllm", "rollout"
    assert replay_conflicts(c) is None                              # vLLM returns its routing
    c.agent.enable = True                                           # the agent's traces do not
    assert "rollout.logprob_mode" in replay_conflicts(c)
    with pytest.raises(PlanError, match="model.moe.routing_replay"):
        check_no_moe_options(MoEConfig(routing_replay=True))       # a dense model


def _share(hf, share: int, out: str) -> None:
    """Rows share::2 (what DP rank `share` holds at EP=2) through the replay case; saved."""
    batch, gap_on, gap_off, metrics = _replay_case(hf, 0.03, range(share, ROWS, 2))
    torch.save({"ids": batch["response_routed_experts"], "prompt": batch["prompt_routed_experts"],
                "resp": batch["response_ids"], "gaps": (gap_on, gap_off), "metrics": metrics}, out)


def _ep_worker(rank, world, hf, out):
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(ep=world, timeout_s=60)
    _share(hf, rank, f"{out}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_ep2_records_and_replays_like_ep1(hf, tmp_path):
    """DP=2 x EP=2 (the alltoall exchanges the ranks' tokens): each rank's recorded experts and
    sampled tokens equal EP=1 on the same rows; replay agrees on 100% of tokens."""
    run_multiproc(_ep_worker, 2, (hf, str(tmp_path / "ep2")))
    gaps = []
    for rank in range(2):
        _share(hf, rank, f"{tmp_path}/ep1.{rank}")              # EP=1, in this process
        ref, got = torch.load(f"{tmp_path}/ep1.{rank}"), torch.load(f"{tmp_path}/ep2.{rank}")
        assert torch.equal(got["resp"], ref["resp"]) and torch.equal(got["prompt"], ref["prompt"])
        assert torch.equal(got["ids"], ref["ids"])
        assert got["metrics"]["moe/replay_agree_frac"] == 1.0   # reduced over the DP (= EP) ranks
        assert got["metrics"]["moe/replay_mismatch_frac"] > 0
        assert got["gaps"][0] <= got["gaps"][1] + 1e-7
        gaps.append(got["gaps"])
    (on0, off0), (on1, off1) = gaps
    assert on0 + on1 < off0 + off1, gaps           # (3 rows a rank: the 5x drop is asserted at EP=1)


def _pp_worker(rank, world, hf, out):
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(pp=world, timeout_s=60)
    _share(hf, 0, f"{out}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_pp2_stages_record_and_replay_their_own_layers(hf, tmp_path):
    """PP=2: each stage records its MoE layers' slots, the batch holds all of them (= PP=1's)."""
    run_multiproc(_pp_worker, 2, (hf, str(tmp_path / "pp2")))
    _share(hf, 0, f"{tmp_path}/pp1")
    ref = torch.load(f"{tmp_path}/pp1")
    for rank in range(2):
        got = torch.load(f"{tmp_path}/pp2.{rank}")
        assert torch.equal(got["resp"], ref["resp"]) and torch.equal(got["ids"], ref["ids"]), rank
        assert torch.equal(got["prompt"], ref["prompt"])
        assert got["metrics"] == pytest.approx(ref["metrics"]) and got["metrics"]["moe/replay_agree_frac"] == 1.0
        assert got["gaps"] == pytest.approx(ref["gaps"], rel=1e-4, abs=1e-7)
