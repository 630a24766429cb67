"""Start-up shared by every recipe: resolve the run plan, initialise the parallel state,
seed, and build what does not depend on the recipe (tokenizer, data, rewards, logger).

The plan is resolved before anything is built, so an option the layout cannot honour
fails here, by name, before a model is loaded; it is printed and written to
`RUN_DIR/plan.json`.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from megatron_rl.config.schema import Config


def set_seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class RunContext:
    """What every recipe's loop reads besides its roles."""
    cfg: Config
    plan: object            # megatron_rl.plan.RunPlan
    tokenizer: object
    data: object            # data.PromptLoader
    rewards: object         # rewards.RewardManager
    logger: object          # logging.MetricsLogger


def plan_device() -> str:
    """The device kind the plan is resolved for: `cuda` when this process sees a GPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_memory_gib() -> float:
    """This GPU's memory for the plan's estimate (the planner's 80 GiB default is an H100's;
    on an H200 it misjudged vLLM's `gpu_memory_utilization` share by 25 GiB)."""
    if not torch.cuda.is_available():
        return 80.0
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def world_size() -> int:
    """The world the plan is resolved for: the whole torchrun world (the plan takes the rollout
    ranks of a disaggregated placement off), else the initialised or launched one."""
    import torch.distributed as dist

    from megatron_rl.async_rl.world import active_placement
    if active_placement() is not None:
        return active_placement().world_size
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def bootstrap(cfg: Config) -> RunContext:
    import transformers

    from megatron_rl.config import to_dict
    from megatron_rl.data import PromptLoader
    from megatron_rl.logging import MetricsLogger
    from megatron_rl.parallel import init_distributed
    from megatron_rl.plan import resolve_plan
    from megatron_rl.rewards import RewardManager

    if not cfg.model.path:
        raise ValueError("model.path is required (an HF directory or a megatron-rl checkpoint)")
    plan = resolve_plan(cfg, world_size=world_size(), device=plan_device(), gpu_mem_gib=device_memory_gib())
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    m = cfg.model
    init_distributed(tp=m.tp, pp=m.pp, vpp=m.vpp, cp=m.cp, ep=m.ep, etp=m.etp, seed=cfg.trainer.seed)
    set_seed(cfg.trainer.seed, cfg.trainer.deterministic)
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    if _rank() == 0:
        print(plan.summary(), flush=True)
        plan.write_json(os.path.join(cfg.logging.run_dir, "plan.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(m.tokenizer_path or m.path)
    logger = MetricsLogger(cfg.logging, total_steps=cfg.trainer.total_steps, run_config=to_dict(cfg))
    return RunContext(cfg=cfg, plan=plan, tokenizer=tokenizer, data=PromptLoader(cfg.data, tokenizer),
                      rewards=RewardManager(cfg.reward), logger=logger)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def build_engine(cfg: Config, actor, tokenizer):
    """The rollout engine (`rollout.engine`), wrapped by the agent tool loop when `agent.enable`."""
    if cfg.rollout.engine == "native":
        from megatron_rl.rollout.native_engine import NativeEngine
        engine = NativeEngine(actor.chunks, tokenizer, steering=actor.steering)
    elif cfg.rollout.engine == "vllm":
        try:
            from megatron_rl.rollout.vllm_engine import VLLMEngine
        except ImportError as e:
            raise RuntimeError(f"rollout.engine=vllm needs vLLM, which is not importable here ({e})") from None
        engine = VLLMEngine.from_config(cfg, tokenizer)
    else:
        raise ValueError(f"rollout.engine must be native|vllm, got {cfg.rollout.engine!r}")
    if cfg.agent.enable:
        from megatron_rl.agent import AgentRolloutEngine
        engine = AgentRolloutEngine(engine, tokenizer, cfg.agent)
    return engine
