"""DAPO dynamic sampling (`algos.dynamic_sampling`): a group whose responses all agree on
the filter metric has zero advantage and carries no signal; drop it and generate more
rounds of prompts until each DP rank has its `plan.sampling.groups_per_dp_rank` groups.

- Lockstep: ranks draw the same global prompt batch each round and keep their own shard,
  so their groups differ; every round ends with an all-reduce of "I still need groups"
  over the world, so all ranks (DP, and the TP/PP ranks that generate together) run the
  same number of rounds and the samplers stay in step.
- Fixed size: a rank keeps the first groups it needs and drops the surplus; at the round
  cap (`max_num_gen_batches`) the missing groups are filled with dropped ones whose
  `response_mask` is zeroed, so the step trains on exactly the plan's sample count and
  no zero-variance group reaches the loss either way (`dynamic_sampling/cap_hit` says so).
- The step's `reward/*` metrics are the first round's (the policy's fresh batch, as
  without dynamic sampling); `dynamic_sampling/*` count rounds and kept / dropped / filler
  groups over all ranks, and `dynamic_sampling/trained_reward_mean` is the trained groups'.
"""
from __future__ import annotations

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.logging.values import MeanOver, Summed
from megatron_rl.plan.sampling import SCORE_METRICS


def metric_values(batch: Batch, rows: list[int], metric: str) -> list[float]:
    """The filter metric of `rows`: the (shaped) score, or a reward's numeric extra key."""
    out = []
    for i in rows:
        s = batch.samples[i]
        if metric in SCORE_METRICS:
            out.append(float(s["score"]))
            continue
        extra = s.get("reward_extras") or {}
        if metric not in extra:
            raise KeyError(f"algos.dynamic_sampling.metric={metric!r}: the reward returned no such key for sample "
                           f"{s.get('uid', '?')} (its extra keys: {sorted(extra)}); use metric=score or a key "
                           f"the reward's dict return holds")
        out.append(float(extra[metric]))
    return out


def groups_of(batch: Batch) -> list[list[int]]:
    """Row indices of each group, in order of first appearance."""
    order: dict = {}
    for i, g in enumerate(batch.field("group")):
        order.setdefault(g, []).append(i)
    return list(order.values())


def split_by_signal(batch: Batch, metric: str) -> tuple[list[list[int]], list[list[int]]]:
    """(kept, dropped) groups: a group is dropped when every response has the same metric
    value (a group of one is kept, as in verl)."""
    kept, dropped = [], []
    for rows in groups_of(batch):
        vals = metric_values(batch, rows, metric)
        (kept if len(rows) == 1 or max(vals) > min(vals) else dropped).append(rows)
    return kept, dropped


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on some rank (the world group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def assemble(parts: list[tuple[Batch, list[int]]], fillers: int, pad_id: int) -> Batch:
    """One batch of the selected groups' rows (`parts`: (round batch, rows)); the last
    `fillers` groups' loss masks are zeroed."""
    pieces = [b.select(rows) for b, rows in parts]
    for piece in pieces[len(pieces) - fillers:] if fillers else []:
        piece["response_mask"] = torch.zeros_like(piece["response_mask"])
    return Batch.concat(pieces, pad_values={"prompt_ids": pad_id, "response_ids": pad_id})


def collect(tr, step: int) -> tuple[Batch, dict[str, float]]:
    """The step's scored batch: one `tr.rollout_round` without dynamic sampling, else
    rounds until every rank has its groups or the cap is hit (module docstring)."""
    plan = tr.plan.sampling
    if plan is None or not plan.dynamic_sampling:
        return tr.rollout_round(step, 0)
    target, cap = plan.groups_per_dp_rank, plan.max_rounds
    kept: list[tuple[Batch, list[int]]] = []
    dropped: list[tuple[Batch, list[int]]] = []
    metrics: dict[str, float] = {}
    rounds, cap_hit = 0, False
    while True:
        batch, m = tr.rollout_round(step, rounds)
        for s in batch.samples:                     # a prompt drawn again in a later round is its own group
            s["group"] = (rounds, s["group"])
        if rounds == 0:
            metrics.update(m)
        rounds += 1
        k, d = split_by_signal(batch, plan.metric)
        kept += [(batch, rows) for rows in k]
        dropped += [(batch, rows) for rows in d]
        if not any_rank(len(kept) < target):
            break
        if cap and rounds >= cap:
            cap_hit = True
            break
    fillers = max(0, target - len(kept))
    chosen = kept[:target] + dropped[:fillers]
    out = assemble(chosen, fillers, tr.data.pad_id)
    trained = [float(out.samples[i]["score"]) for rows in groups_of(out)[:target - fillers] for i in rows]
    metrics.update({
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/cap_hit": float(cap_hit),
        "dynamic_sampling/kept_groups": Summed(len(kept)),
        "dynamic_sampling/dropped_groups": Summed(len(dropped)),
        "dynamic_sampling/filler_groups": Summed(fillers),
        "dynamic_sampling/kept_frac": MeanOver(len(kept) / max(1, len(kept) + len(dropped)), len(kept) + len(dropped)),
        "dynamic_sampling/trained_reward_mean": MeanOver.of(trained),
    })
    if cap_hit:
        import logging
        logging.getLogger(__name__).warning(
            "step %d: dynamic sampling hit algos.dynamic_sampling.max_num_gen_batches=%d with %d of %d groups on this "
            "rank; %d filler groups train with a zeroed loss mask", step, cap, len(kept), target, fillers)
    return out, metrics
