"""One builder for every model role: load the trunk for this rank's layout, then (for a
trained role) Megatron DDP, Megatron's optimizer and the LR schedule over the plan's
horizon in optimizer steps. Actor, critic and discriminator differ only in their path,
head, optimizer section and batch sizes, which the run plan gives each of them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rl.config.schema import Config, OptimConfig
from megatron_rl.models import load_checkpoint


def use_distributed_optimizer(optim: OptimConfig) -> bool:
    """`*.optim.distributed_optimizer`: None means on for GPU, off on CPU."""
    return torch.cuda.is_available() if optim.distributed_optimizer is None else optim.distributed_optimizer


def build_optimizer(ddp_model, optim: OptimConfig, dtype: str, total_steps: int):
    """Megatron's optimizer and an LR schedule whose decay ends after `total_steps`
    optimizer steps (the plan's `lr_horizon_steps`)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                          adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps,
                          clip_grad=optim.clip_grad, bf16=dtype in ("bfloat16", "bf16"),
                          fp16=dtype in ("float16", "fp16"), use_distributed_optimizer=use_distributed_optimizer(optim))
    chunks = ddp_model if isinstance(ddp_model, list) else [ddp_model]
    opt = get_megatron_optimizer(cfg, chunks)
    decay = {"constant": "constant", "cosine": "cosine", "linear": "linear"}[optim.lr_schedule]
    sched = OptimizerParamScheduler(opt, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr,
                                    min_lr=optim.min_lr, lr_warmup_steps=optim.lr_warmup_steps,
                                    lr_decay_steps=max(total_steps, optim.lr_warmup_steps + 1),
                                    lr_decay_style=decay, start_wd=optim.weight_decay,
                                    end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1),
                                    wd_incr_style="constant")
    return opt, sched


def wrap_ddp(model, use_dist_opt: bool):
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(
                                      grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                      use_distributed_optimizer=use_dist_opt))
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


@dataclass
class TrainedModel:
    """What a trained role holds: the trunk, its DDP wrapper, optimizer and schedule."""
    model: object
    ddp: object
    optimizer: object
    scheduler: object


def load_trunk(cfg: Config, path: str, *, trainable: bool, value_head: bool = False) -> list:
    """This rank's model chunks (one per `model.vpp` stage, else one) from `path`, with the
    run's dtype, spec and parallel options; frozen roles get no recompute and no gradients;
    `value_head` adds the scalar head (critic, discriminator: one chunk, the plan refuses
    them under VPP) on the last stage."""
    from megatron_rl.models.loading import load_model_chunks

    mc = cfg.model
    if value_head and mc.sequence_parallel:
        raise ValueError("model.sequence_parallel=true with a value-head role (critic / GAD discriminator): "
                         "the head reads full hidden states; set model.sequence_parallel=false")
    kwargs = dict(recompute=mc.recompute, sequence_parallel=mc.sequence_parallel) if trainable else {}
    if trainable:                               # model.fp8: the trained roles' GEMMs (models/fp8.py)
        from megatron_rl.models.fp8 import fp8_model_kwargs
        kwargs.update(fp8_model_kwargs(mc))
    if trainable and not mc.freeze_vision:      # vision-language: train the tower too (models/vl)
        kwargs["freeze_vision"] = False
    chunks = load_model_chunks(path, dtype=mc.dtype, layer_spec=mc.layer_spec, moe=mc.moe, **kwargs)
    if value_head:
        from megatron_rl.models.value_head import attach_value_head
        attach_value_head(chunks[-1], seed=cfg.trainer.seed)
    if not trainable:
        for c in chunks:
            for p in c.parameters():
                p.requires_grad_(False)
            c.eval()
    return chunks


def build_trained(cfg: Config, path: str, optim: OptimConfig, horizon_steps: int, *,
                  value_head: bool = False) -> TrainedModel:
    """load -> Megatron DDP (one per chunk) -> optimizer + LR schedule, the same for every
    trained role. `model` / `ddp` are lists of chunks."""
    from megatron_rl.trainer.ddp import wrap_ddp_chunks

    chunks = load_trunk(cfg, path, trainable=True, value_head=value_head)
    ddp = wrap_ddp_chunks(chunks, use_distributed_optimizer(optim))
    opt, sched = build_optimizer(ddp, optim, cfg.model.dtype, horizon_steps)
    return TrainedModel(chunks, ddp, opt, sched)


def build_actor(cfg: Config, plan):
    """The trained policy (`model.path`, `actor.*`), its LR schedule over the plan's horizon;
    its `offloader` moves the training state (and by option the weights) to host memory
    while the engine generates, as `actor.offload_during_rollout` resolved in the plan."""
    from megatron_rl.trainer.policy import Policy

    t = build_trained(cfg, cfg.model.path, cfg.actor.optim, plan.role("actor").lr_horizon_steps)
    actor = Policy(t.model, micro_batch_size=cfg.actor.micro_batch_size, temperature=cfg.rollout.temperature,
                   optimizer=t.optimizer, scheduler=t.scheduler, ddp_model=t.ddp,
                   fused_backend=plan.loss_backend,
                   max_tokens_per_microbatch=cfg.actor.max_tokens_per_microbatch,
                   routing_replay=cfg.model.moe.routing_replay)
    mode = plan.rollout.offload_during_rollout
    if mode != "none":
        from megatron_rl.models.offload import TrainingStateOffloader
        actor.offloader = TrainingStateOffloader(t.ddp, t.optimizer, offload_weights=mode == "state_and_weights")
    return actor


def build_frozen_policy(cfg: Config, plan, *, offload: bool = False):
    """A frozen copy of `model.path`: the reference (`ref.offload` keeps its weights in
    host memory between log-prob passes) or the LLM of predictor training."""
    from megatron_rl.trainer.policy import Policy

    chunks = load_trunk(cfg, cfg.model.path, trainable=False)
    policy = Policy(chunks, micro_batch_size=cfg.actor.micro_batch_size, temperature=cfg.rollout.temperature,
                    fused_backend=plan.loss_backend,
                    max_tokens_per_microbatch=cfg.actor.max_tokens_per_microbatch)
    if offload:
        from megatron_rl.models.offload import WeightOffloader
        policy.offloader = WeightOffloader(chunks)
        policy.offload()
    return policy


def attach_steering(cfg: Config, actor) -> None:
    """`steering.enable` on the actor: its rollouts are steered; its log-prob and update
    forwards too (`logprob_mode: recompute`) or not (`rollout_is`: IS-corrected)."""
    from megatron_rl.steering import build_steering

    actor.steering = build_steering(cfg.steering, actor.chunks)
    if cfg.steering.logprob_mode == "rollout_is":
        if cfg.rollout.logprob_mode == "rollout":
            raise ValueError("steering.logprob_mode=rollout_is needs rollout.logprob_mode=recompute: "
                             "its old log-probs are the unsteered recompute, the IS weight corrects to them")
        from megatron_rl.steering.rollout_is import UnsteeredTraining
        actor.steering = UnsteeredTraining(actor.steering)


def build_policy_roles(cfg: Config, plan):
    """Actor (+ steering), reference and critic from their parts of the plan."""
    from megatron_rl.trainer.roles import Roles

    roles = Roles(actor=build_actor(cfg, plan))
    if cfg.steering.enable:
        attach_steering(cfg, roles.actor)
    if plan.has_role("reference"):
        roles.reference = build_frozen_policy(cfg, plan, offload=plan.role("reference").offload)
    if plan.has_role("critic"):
        from megatron_rl.trainer.critic import build_critic
        roles.critic = build_critic(cfg, plan.role("critic").lr_horizon_steps)
    if plan.has_role("reward_model"):
        roles.reward_model = build_reward_model_role(cfg, plan)
    return roles


def build_reward_model_role(cfg: Config, plan):
    """`reward.model`: the frozen sequence-classification reward model, placed as the plan says;
    the policy's tokenizer decides whether its inputs are re-rendered (`reward.model.template`)."""
    import transformers

    from megatron_rl.rewards.reward_model import build_reward_model

    policy_tok = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    return build_reward_model(cfg.reward.model, policy_tok, dtype=cfg.model.dtype, layer_spec=cfg.model.layer_spec,
                              offload=plan.role("reward_model").offload)


def build_kl_controller(cfg: Config):
    from megatron_rl.algos import kl_controller

    a = cfg.algos
    return kl_controller(a.kl_ctrl, init_kl_coef=a.kl_coef, target_kl=a.target_kl, horizon=a.kl_horizon)
