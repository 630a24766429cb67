"""Workers of the critic's elastic-resume test (spawned gloo processes import them by name):
a PPO critic (trunk + value head) trained at one DP size, checkpointed through the run's
CheckpointManager, restored at another; Adam state per parameter name, the LR schedule and
the next update are written out for the comparison."""
import torch

STEPS_BEFORE_SAVE = 2
GLOBAL_BATCH = 4


def _critic(hf, tp=1, pp=1):
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.value_head import attach_value_head
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.critic import Critic

    init_distributed(tp=tp, pp=pp)
    model = load_checkpoint(hf, layer_spec="local")
    attach_value_head(model, seed=0)
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0), "float32", 10)
    return Critic(ddp, opt, sched, micro_batch_size=1)


def _global_batch(step: int):
    """Full response masks: every row has the same token count, so the token-mean loss of a DP
    shard averaged over DP equals the full batch's (the update does not depend on the DP size)."""
    from tests.trainer.test_critic import value_batch

    batch = value_batch(seed=200 + step, b=GLOBAL_BATCH)
    batch["response_mask"] = torch.ones_like(batch["response_mask"])
    batch["prompt_mask"] = torch.ones_like(batch["prompt_mask"])
    batch["returns"] = torch.rand(batch["returns"].shape, generator=torch.Generator().manual_seed(step)) - 0.5
    return batch


def _update(critic, step: int) -> None:
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import CriticConfig
    from megatron_rl.parallel.data_parallel import shard_for_dp

    batch = _global_batch(step).select(shard_for_dp(list(range(GLOBAL_BATCH))))
    batch["values"] = critic.compute_values(batch)
    critic.update(batch, AlgosConfig(adv_estimator="gae"), CriticConfig(enable=True, cliprange_value=0.5))


def adam_by_name(critic) -> dict:
    """{parameter name: {exp_avg, exp_avg_sq, step}} (TP=1: every parameter is full)."""
    parts = getattr(critic.optimizer, "chained_optimizers", None) or [critic.optimizer]
    state = {id(p): st for o in parts for p, st in o.optimizer.state.items()}
    return {n: {"exp_avg": state[id(p)]["exp_avg"].clone(), "exp_avg_sq": state[id(p)]["exp_avg_sq"].clone(),
                "step": float(state[id(p)]["step"])} for n, p in critic.model.named_parameters()}


def _dump(critic, out_file, **extra) -> None:
    if torch.distributed.get_rank() == 0:
        weights = {n: p.detach().clone() for n, p in critic.model.named_parameters()}
        torch.save({"weights": weights, **extra}, out_file)


def critic_first_run(rank, world, hf, run_dir, ref_file):
    """STEPS_BEFORE_SAVE updates, a checkpoint, one more update (the uninterrupted reference)."""
    from megatron_rl.parallel import destroy_distributed
    from megatron_rl.trainer.checkpoint import CheckpointManager

    critic = _critic(hf)
    for step in range(STEPS_BEFORE_SAVE):
        _update(critic, step)
    CheckpointManager(run_dir).save(STEPS_BEFORE_SAVE, {"critic": critic}, {})
    adam, sched = adam_by_name(critic), critic.scheduler.state_dict()
    _update(critic, STEPS_BEFORE_SAVE)
    _dump(critic, ref_file, adam=adam, sched=sched)
    destroy_distributed()


def critic_resumed_run(rank, world, hf, run_dir, out_file):
    """A fresh critic at another DP size, restored; then the same next update."""
    from megatron_rl.parallel import destroy_distributed
    from megatron_rl.trainer.checkpoint import CheckpointManager

    critic = _critic(hf)
    manager = CheckpointManager(run_dir)
    manager.restore(manager.find("auto"), {"critic": critic})
    adam, sched = adam_by_name(critic), critic.scheduler.state_dict()
    _update(critic, STEPS_BEFORE_SAVE)
    _dump(critic, out_file, adam=adam, sched=sched)
    destroy_distributed()


def check_critic(ref_file, out_file):
    ref, got = torch.load(ref_file), torch.load(out_file)
    assert ref["adam"].keys() == got["adam"].keys() and "value_head.weight" in ref["adam"]
    for name, st in ref["adam"].items():
        assert st["step"] == got["adam"][name]["step"] == STEPS_BEFORE_SAVE, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], got["adam"][name][key]), f"{name}.{key}"
    assert ref["sched"] == got["sched"] and ref["sched"]["num_steps"] == STEPS_BEFORE_SAVE
    for name, w in ref["weights"].items():                     # the next update, at the new DP size
        d = (w - got["weights"][name]).abs()
        assert d.max() < 5e-5 and d.mean() < 1e-6, name
