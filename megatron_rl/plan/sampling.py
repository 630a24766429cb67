"""What the plan knows of DAPO's sampling options (`algos.dynamic_sampling`,
`reward.overlong`, `algos.mask_truncated`), checked once.

With dynamic sampling a step may generate several rounds of `data.train_batch_size`
prompts, but it always TRAINS on exactly `samples_per_step` samples (the batch plan's),
so mini-batch counts, optimizer steps and the LR horizon are unchanged: extra groups are
dropped, and at the round cap the missing groups are filled with masked filler groups.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.plan.batch import BatchPlan
from megatron_rl.plan.layout import PlanError

SCORE_METRICS = ("score", "seq_reward", "seq_final_reward")


@dataclass(frozen=True)
class SamplingPlan:
    dynamic_sampling: bool
    metric: str                     # score | a reward's extra key
    max_rounds: int                 # generation rounds per step (0: no cap)
    groups_per_dp_rank: int         # kept groups each DP rank trains on (fixed)
    samples_per_dp_rank: int        # fixed: groups_per_dp_rank x rollout.n
    overlong_buffer_len: int        # 0: off
    mask_truncated: bool


def resolve_sampling(cfg, batch: BatchPlan, recipe: str) -> SamplingPlan:
    ds, ov, a = cfg.algos.dynamic_sampling, cfg.reward.overlong, cfg.algos
    agent = bool(cfg.agent.enable)
    shaping = ov.buffer_len > 0 or a.mask_truncated
    if (ds.enable or shaping) and recipe not in ("grpo", "ppo"):
        raise PlanError(f"algos.dynamic_sampling / reward.overlong / algos.mask_truncated apply to the grpo/ppo "
                        f"recipe; this config runs the {recipe} recipe")
    if shaping and agent:
        raise PlanError("reward.overlong / algos.mask_truncated measure responses against rollout.max_new_tokens; "
                        "with agent.enable the response is a multi-turn trace (agent.max_response_length): "
                        "not supported yet")
    if ov.buffer_len >= cfg.rollout.max_new_tokens:
        raise PlanError(f"reward.overlong.buffer_len={ov.buffer_len} must be below rollout.max_new_tokens="
                        f"{cfg.rollout.max_new_tokens} (the penalty starts buffer_len tokens before the limit)")
    if ds.enable:
        if cfg.rollout.n < 2:
            raise PlanError("algos.dynamic_sampling.enable needs rollout.n >= 2: a group of one response has "
                            "no variance to filter on")
        if ds.metric == "seq_final_reward" and a.use_kl_in_reward:
            raise PlanError("algos.dynamic_sampling.metric=seq_final_reward with algos.use_kl_in_reward: the "
                            "KL-shaped reward is computed after sampling here; use metric=score")
    return SamplingPlan(dynamic_sampling=ds.enable, metric=ds.metric, max_rounds=ds.max_num_gen_batches,
                        groups_per_dp_rank=batch.prompts_per_dp_rank, samples_per_dp_rank=batch.samples_per_dp_rank,
                        overlong_buffer_len=ov.buffer_len, mask_truncated=a.mask_truncated)


def sampling_line(s: SamplingPlan) -> str:
    parts = []
    if s.dynamic_sampling:
        cap = f"<= {s.max_rounds} rounds" if s.max_rounds else "no round cap"
        parts.append(f"dynamic sampling on {s.metric} ({cap}); trains on exactly {s.groups_per_dp_rank} groups "
                     f"= {s.samples_per_dp_rank} samples per DP rank each step")
    if s.overlong_buffer_len:
        parts.append(f"overlong penalty in the last {s.overlong_buffer_len} tokens")
    if s.mask_truncated:
        parts.append("truncated responses masked")
    return "; ".join(parts) or "as generated"
