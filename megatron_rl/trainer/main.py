"""`megatron-rl train`: pick the recipe, build it from the config, run its loop.

Recipes (a registry, `RECIPES`, keyed by the plan's recipe name): `grpo` / `ppo` (GRPO, PPO
with a critic and friends: `Trainer`), `gad` (`gad.enable`), `steering_predictor`
(`steering.enable` + `steering.predictor.enable`: the LLM is frozen, only the strength
predictor learns). Each builder is bootstrap -> roles -> engine.
"""
from __future__ import annotations

from megatron_rl.algos.registry import Registry
from megatron_rl.config import load_experiment_config
from megatron_rl.config.schema import Config
from megatron_rl.plan.roles import recipe
from megatron_rl.trainer.bootstrap import bootstrap, build_engine
from megatron_rl.trainer.build import build_kl_controller, build_policy_roles

RECIPES = Registry("recipe")


@RECIPES.register("grpo", "ppo")
def build_trainer(cfg: Config):
    from megatron_rl.trainer.loop import Trainer

    ctx = bootstrap(cfg)
    roles = build_policy_roles(cfg, ctx.plan)
    token_weights = None
    if cfg.token_weights.source != "none":
        from megatron_rl.token_weights import build_token_weights
        token_weights = build_token_weights(cfg, roles.actor, ctx.tokenizer)
    if ctx.plan.rollout.placement == "disaggregated":      # the engine on its own ranks (async_rl/)
        from megatron_rl.async_rl.trainer import build_async_trainer
        return build_async_trainer(cfg, ctx, roles, kl_ctrl=build_kl_controller(cfg), token_weights=token_weights)
    return Trainer(**vars(ctx), roles=roles, engine=build_engine(cfg, roles.actor, ctx.tokenizer),
                   kl_ctrl=build_kl_controller(cfg), token_weights=token_weights)


@RECIPES.register("gad")
def _gad(cfg: Config):
    from megatron_rl.trainer.gad import build_gad_trainer
    return build_gad_trainer(cfg)


@RECIPES.register("steering_predictor")
def _predictor(cfg: Config):
    from megatron_rl.trainer.steering_loop import build_predictor_trainer
    return build_predictor_trainer(cfg)


def train_main(config_path, overrides=None) -> int:
    import torch.distributed as dist

    from megatron_rl.trainer.children import die_with_trainer
    die_with_trainer()                   # children (checkpoint writers, pools) die with a killed trainer
    cfg = load_experiment_config(config_path, overrides)
    if cfg.rollout.placement == "disaggregated":
        from megatron_rl.async_rl.trainer import split_or_serve
        from megatron_rl.async_rl.world import leave_world
        if split_or_serve(cfg):          # a rollout rank: it served the trainer until told to stop
            leave_world()
            return 0
        try:
            return _train(cfg, dist)
        finally:
            leave_world()
    return _train(cfg, dist)


def _train(cfg: Config, dist) -> int:
    trainer = RECIPES.lookup(recipe(cfg))(cfg)
    try:
        before, after = trainer.fit()
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    if not dist.is_initialized() or dist.get_rank() == 0:
        b = f"{before:.3f}" if before is not None else "n/a"
        print(f"validation reward: {b} -> {after:.3f}", flush=True)
    return 0
