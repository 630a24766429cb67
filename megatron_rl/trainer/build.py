"""Building the roles: actor (Megatron DDP + optimizer + LR schedule) and reference."""
from __future__ import annotations

import torch

from megatron_rl.config.schema import Config, OptimConfig
from megatron_rl.models import load_checkpoint
from megatron_rl.trainer.policy import Policy


def fused_backend(setting: str) -> str | None:
    """actor.fused_loss: auto -> kernels pick (Triton on CUDA); off -> the torch reference."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"actor.fused_loss must be auto|on|off, got {setting!r}")
    if setting == "off":
        return "reference"
    if setting == "on" and not torch.cuda.is_available():
        raise ValueError("actor.fused_loss: on needs a CUDA GPU (Triton); use auto or off on CPU")
    return None


def build_optimizer(ddp_model, optim: OptimConfig, dtype: str, total_steps: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    use_dist = optim.distributed_optimizer if optim.distributed_optimizer is not None else torch.cuda.is_available()
    cfg = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                          adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps,
                          clip_grad=optim.clip_grad, bf16=dtype in ("bfloat16", "bf16"),
                          fp16=dtype in ("float16", "fp16"), use_distributed_optimizer=use_dist)
    opt = get_megatron_optimizer(cfg, [ddp_model])
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


def build_actor(cfg: Config) -> Policy:
    mc = cfg.model
    model = load_checkpoint(mc.path, dtype=mc.dtype, layer_spec=mc.layer_spec, recompute=mc.recompute,
                            sequence_parallel=mc.sequence_parallel)
    use_dist = cfg.actor.optim.distributed_optimizer
    use_dist = torch.cuda.is_available() if use_dist is None else use_dist
    ddp = wrap_ddp(model, use_dist)
    opt, sched = build_optimizer(ddp, cfg.actor.optim, mc.dtype, cfg.trainer.total_steps *
                                 max(1, cfg.actor.ppo_epochs))
    return Policy(model, micro_batch_size=cfg.actor.micro_batch_size, temperature=cfg.rollout.temperature,
                  optimizer=opt, scheduler=sched, ddp_model=ddp, fused_backend=fused_backend(cfg.actor.fused_loss),
                  max_tokens_per_microbatch=cfg.actor.max_tokens_per_microbatch)


def build_reference(cfg: Config) -> Policy:
    mc = cfg.model
    model = load_checkpoint(mc.path, dtype=mc.dtype, layer_spec=mc.layer_spec)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return Policy(model, micro_batch_size=cfg.actor.micro_batch_size, temperature=cfg.rollout.temperature,
                  fused_backend=fused_backend(cfg.actor.fused_loss),
                  max_tokens_per_microbatch=cfg.actor.max_tokens_per_microbatch)


def reference_needed(cfg: Config) -> bool:
    if cfg.ref.enable is not None:
        return cfg.ref.enable
    return cfg.algos.use_kl_loss or cfg.algos.use_kl_in_reward
