"""`megatron-rl train`: build every component from the config and run the loop."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from megatron_rl.config import load_experiment_config, to_dict


def set_seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_engine(cfg, actor, tokenizer):
    if cfg.rollout.engine == "native":
        from megatron_rl.rollout.native_engine import NativeEngine
        engine = NativeEngine(actor.model, tokenizer, steering=actor.steering)
    elif cfg.rollout.engine == "vllm":
        try:
            from megatron_rl.rollout.vllm_engine import VLLMEngine
        except ImportError as e:
            raise RuntimeError(f"rollout.engine=vllm needs vLLM, which is not importable here ({e})") from None
        engine = VLLMEngine.from_config(cfg, tokenizer)
    else:
        raise ValueError(f"rollout.engine must be native|vllm, got {cfg.rollout.engine!r}")
    if getattr(cfg.agent, "enable", False):
        from megatron_rl.agent import AgentRolloutEngine
        engine = AgentRolloutEngine(engine, tokenizer, cfg.agent)
    return engine


def build_trainer(cfg):
    import transformers

    from megatron_rl.algos import kl_controller
    from megatron_rl.data import PromptLoader
    from megatron_rl.logging import MetricsLogger
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rewards import RewardManager
    from megatron_rl.trainer.build import build_actor, build_reference, reference_needed
    from megatron_rl.trainer.loop import Trainer

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    init_distributed(tp=cfg.model.tp, pp=cfg.model.pp, vpp=cfg.model.vpp, seed=cfg.trainer.seed)
    set_seed(cfg.trainer.seed, cfg.trainer.deterministic)
    if not cfg.model.path:
        raise ValueError("model.path is required (an HF directory or a megatron-rl checkpoint)")
    if cfg.algos.adv_estimator == "gae" and not cfg.critic.enable:
        raise ValueError("algos.adv_estimator=gae needs values from a critic: set critic.enable=true "
                         "(or choose another algos.adv_estimator, e.g. grpo)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or _tokenizer_dir(cfg.model.path))
    actor = build_actor(cfg)
    if getattr(cfg.steering, "enable", False):
        from megatron_rl.steering import build_steering
        actor.steering = build_steering(cfg.steering, actor.model)
        if cfg.steering.logprob_mode == "rollout_is":
            # the engine steers; the actor's log-prob and update forwards run unsteered (IS-corrected)
            if cfg.rollout.logprob_mode == "rollout":
                raise ValueError("steering.logprob_mode=rollout_is needs rollout.logprob_mode=recompute: "
                                 "its old log-probs are the unsteered recompute, the IS weight corrects to them")
            from megatron_rl.steering.rollout_is import UnsteeredTraining
            actor.steering = UnsteeredTraining(actor.steering)
    reference = build_reference(cfg) if reference_needed(cfg) else None
    critic = None
    if cfg.critic.enable:
        from megatron_rl.trainer.critic import build_critic
        critic = build_critic(cfg)
    a = cfg.algos
    kl_ctrl = kl_controller(a.kl_ctrl, init_kl_coef=a.kl_coef, target_kl=a.target_kl, horizon=a.kl_horizon)
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    logger = MetricsLogger(cfg.logging, total_steps=cfg.trainer.total_steps, run_config=to_dict(cfg))
    token_weights = None
    if getattr(cfg.token_weights, "source", "none") != "none":
        from megatron_rl.token_weights import build_token_weights
        token_weights = build_token_weights(cfg, actor, tokenizer)
    return Trainer(cfg=cfg, tokenizer=tokenizer, data=PromptLoader(cfg.data, tokenizer),
                   engine=build_engine(cfg, actor, tokenizer), actor=actor, reference=reference,
                   rewards=RewardManager(cfg.reward), kl_ctrl=kl_ctrl, logger=logger,
                   token_weights=token_weights, critic=critic)


def _tokenizer_dir(path: str) -> str:
    return path


def train_main(config_path, overrides=None) -> int:
    import torch.distributed as dist

    cfg = load_experiment_config(config_path, overrides)
    if getattr(cfg.gad, "enable", False):
        from megatron_rl.trainer.gad import build_gad_trainer
        trainer = build_gad_trainer(cfg)
    elif getattr(cfg.steering, "enable", False) and cfg.steering.predictor.enable:
        # The LLM stays frozen; only the strength predictor learns (megatron_rl/trainer/steering_loop.py).
        from megatron_rl.trainer.steering_loop import build_predictor_trainer
        trainer = build_predictor_trainer(cfg)
    else:
        trainer = build_trainer(cfg)
    try:
        before, after = trainer.fit()
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    if not dist.is_initialized() or dist.get_rank() == 0:
        b = f"{before:.3f}" if before is not None else "n/a"
        print(f"validation reward: {b} -> {after:.3f}", flush=True)
    return 0
