"""Workers of test_elastic_resume.py (a module of its own so spawned gloo processes import it
by name): train, save, resume at another layout, gather the Adam state per full parameter."""
import torch

STEPS_BEFORE_SAVE = 2
GLOBAL_BATCH = 4


def _global_batch(step: int):
    from tests.trainer.test_parallel_update import synthetic_batch

    return synthetic_batch(seed=100 + step, b=GLOBAL_BATCH)


def _policy(hf, tp, pp=1):
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    init_distributed(tp=tp, pp=pp)
    model = load_checkpoint(hf, layer_spec="local")
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0), "float32", 10)
    return Policy(model, micro_batch_size=2, optimizer=opt, scheduler=sched, ddp_model=ddp)


def _update(policy, sampler) -> list[int]:
    """One step: the sampler's next global batch, this DP rank's share of it, one optimizer step."""
    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.parallel.data_parallel import shard_for_dp

    prompts = sampler.next_batch()
    mine = shard_for_dp(list(range(GLOBAL_BATCH)))
    policy.update(_global_batch(sampler.epoch * 100 + sampler.batch_in_epoch).select(mine), AlgosConfig(),
                  mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    return prompts


def full_adam_state(policy) -> dict:
    """{global parameter name: {exp_avg, exp_avg_sq, step}} with TP shards gathered into full
    tensors and every pipeline stage's parameters on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_rl.models.loading import iter_local_params
    from megatron_rl.models.weight_mapping import find_rule, tp_unshard

    arch = policy.chunks[0].arch
    parts = getattr(policy.optimizer, "chained_optimizers", None) or [policy.optimizer]
    state = {id(p): st for o in parts for p, st in o.optimizer.state.items()}
    tp, group = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_group()
    out = {}
    for _, gname, p in iter_local_params(policy.chunks):
        rule, _ = find_rule(gname, arch)
        st = state[id(p)]
        full = {}
        for key in ("exp_avg", "exp_avg_sq"):
            shard = st[key].detach().contiguous()
            shards = [shard]
            if tp > 1 and rule.tp_dim is not None:
                shards = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(shards, shard, group=group)
            full[key] = tp_unshard(rule, shards, arch).clone()
        full["step"] = float(st["step"])
        out[gname] = full
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * mpu.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, out, group=mpu.get_pipeline_model_parallel_group())
        out = {k: v for stage in stages for k, v in stage.items()}
    return out


def first_run(rank, world, hf, tp, run_dir, ref_file, pp=1):
    """STEPS_BEFORE_SAVE steps, a checkpoint, then one more step (the uninterrupted reference)."""
    from megatron_rl.data.sampler import ResumableSampler
    from megatron_rl.models import iter_hf_weights
    from megatron_rl.parallel import destroy_distributed
    from megatron_rl.trainer.checkpoint import CheckpointManager

    policy = _policy(hf, tp, pp)
    sampler = ResumableSampler(16, GLOBAL_BATCH, shuffle=True, seed=5)
    for _ in range(STEPS_BEFORE_SAVE):
        _update(policy, sampler)
    CheckpointManager(run_dir).save(STEPS_BEFORE_SAVE, {"actor": policy}, {"data": sampler.state_dict()})
    saved_adam, saved_sched = full_adam_state(policy), policy.scheduler.state_dict()
    next_prompts = _update(policy, sampler)
    weights = dict(iter_hf_weights(policy.model))
    if torch.distributed.get_rank() == 0:
        torch.save({"adam": saved_adam, "sched": saved_sched, "next_prompts": next_prompts, "weights": weights},
                   ref_file)
    destroy_distributed()


def resumed_run(rank, world, hf, tp, run_dir, out_file, pp=1):
    """A fresh actor at another layout, restored from the checkpoint; then the same next step."""
    from megatron_rl.data.sampler import ResumableSampler
    from megatron_rl.models import iter_hf_weights
    from megatron_rl.parallel import destroy_distributed
    from megatron_rl.trainer.checkpoint import CheckpointManager

    policy = _policy(hf, tp, pp)
    manager = CheckpointManager(run_dir)
    state = manager.restore(manager.find("auto"), {"actor": policy})
    sampler = ResumableSampler(16, GLOBAL_BATCH, shuffle=True, seed=5)
    sampler.load_state_dict(state["data"])
    loaded_adam, loaded_sched = full_adam_state(policy), policy.scheduler.state_dict()
    next_prompts = _update(policy, sampler)
    weights = dict(iter_hf_weights(policy.model))
    if torch.distributed.get_rank() == 0:
        torch.save({"adam": loaded_adam, "sched": loaded_sched, "next_prompts": next_prompts, "weights": weights},
                   out_file)
    destroy_distributed()


def check(ref_file, out_file):
    ref, got = torch.load(ref_file), torch.load(out_file)
    for adam in (ref["adam"], got["adam"]):      # tied embeddings: a last stage's copy at PP > 1 only
        tied = adam.pop("output_layer.weight", None) if len(ref["adam"]) != len(got["adam"]) else None
        if tied is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(tied[key], adam["embedding.word_embeddings.weight"][key]), key
    assert ref["adam"].keys() == got["adam"].keys() and len(ref["adam"]) > 10
    for name, st in ref["adam"].items():
        assert st["step"] == got["adam"][name]["step"] == STEPS_BEFORE_SAVE, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], got["adam"][name][key]), f"{name}.{key}"
        assert st["exp_avg_sq"].abs().sum() > 0, name
    assert ref["sched"] == got["sched"] and ref["sched"]["num_steps"] == STEPS_BEFORE_SAVE
    assert ref["next_prompts"] == got["next_prompts"]          # the same global prompt order continues
    for name, w in ref["weights"].items():                     # the next update, at the new layout
        d = (w - got["weights"][name]).abs()
        assert d.max() < 5e-5 and d.mean() < 1e-6, name
