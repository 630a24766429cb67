"""The phases of one RL step, each a function of (trainer state, batch).

rollout -> rewards -> old/ref log-probs -> advantages -> update. `Trainer` in
`loop.py` calls them in order and times each.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_rl.algos import get_advantage_estimator, kl_penalty
from megatron_rl.data.batch import Batch
from megatron_rl.logging.values import MeanOver
from megatron_rl.parallel.data_parallel import dp_group, dp_mean, dp_mean_count, dp_rank_size
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rewards.length_shaping import apply_length_shaping


DP_SEED_STRIDE = 2 ** 32     # wider than a run's spread of engine-side offsets (prompts x n, rounds, chunks)


def rollout_seed(trainer_seed: int, step: int, dp_rank: int, validation: bool = False) -> int:
    """The rollout's seed for one (step, DP rank): each DP rank samples its own prompts with its
    own noise (one shared seed gave DP ranks correlated draws: the same per-prompt vLLM seeds, the
    same native generator stream); the TP/PP/CP/EP peers of a DP rank share it, so they sample
    the same tokens. The engines add their own offsets (per prompt, round, chunk) below the stride,
    so two DP ranks never share a seed; DP rank 0 keeps the seeds of a DP=1 run."""
    base = int(trainer_seed) if validation else int(trainer_seed) * 100003 + int(step)
    return base + DP_SEED_STRIDE * int(dp_rank)


def sampling_params(cfg, step: int, validation: bool = False, plan=None) -> SamplingParams:
    """Training rollouts, or validation's (greedy by default; `ignore_eos` / `min_new_tokens`,
    benchmark knobs, apply to training rollouts only). The engine's log-probs are asked for
    only where the plan says something reads them (`rollout.engine_logprobs`). The seed is this
    DP rank's (`rollout_seed`); a disaggregated rollout gets trainer rank 0's (DP rank 0) for the
    whole batch, its rollout ranks one request's seed."""
    r = cfg.rollout
    seed = rollout_seed(cfg.trainer.seed, step, dp_rank_size()[0], validation=validation)
    if validation:
        return SamplingParams(temperature=r.val_temperature or 1.0, greedy=r.val_greedy or r.val_temperature == 0.0,
                              n=1, max_new_tokens=r.max_new_tokens, stop=list(r.stop), seed=seed,
                              logprobs=False)
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, n=r.n,
                          max_new_tokens=r.max_new_tokens, stop=list(r.stop),
                          seed=seed, ignore_eos=r.ignore_eos,
                          min_new_tokens=r.min_new_tokens,
                          logprobs=plan.rollout.engine_logprobs if plan is not None else True)


def rollout(tr, prompts: Batch, step: int, round_: int = 0) -> Batch:
    """`round_` > 0: a further generation round of the step (dynamic sampling), its own seed."""
    sp = sampling_params(tr.cfg, step, plan=tr.plan)
    if round_:
        sp = dataclasses.replace(sp, seed=sp.seed + 1_000_003 * round_)
    batch = tr.engine.generate(prompts, sp)
    if "group" not in batch.samples[0]:
        raise RuntimeError("rollout engine did not set sample['group']")
    if any("images" in s for s in batch.samples):       # image prompts: no vision tokens in responses
        from megatron_rl.data.multimodal import cut_at_vision_tokens, vision_token_ids
        from megatron_rl.data import pad_token_id
        cut_at_vision_tokens(batch, vision_token_ids(tr.tokenizer), pad_token_id(tr.tokenizer))
    return batch


def decode_responses(tokenizer, batch: Batch) -> list[str]:
    """One batched decode (rewards/decode.py says why)."""
    from megatron_rl.rewards.decode import decode_responses as decode

    return decode(tokenizer, batch)


def rewards(tr, batch: Batch) -> dict[str, float]:
    texts = decode_responses(tr.tokenizer, batch)
    for s, t in zip(batch.samples, texts):
        s["response_text"] = t
    result = tr.rewards.score_batch(batch, texts, reward_model=tr.roles.reward_model)
    scores = torch.tensor(result.scores, dtype=torch.float32)
    lengths = batch["response_mask"].sum(-1)
    n = len(batch)          # count-aware means: exact over DP ranks that hold different numbers of rows
    metrics = {"reward/mean": MeanOver(scores.mean().item(), n), "reward/max": scores.max().item(),
               "reward/min": scores.min().item(), "response_length/mean": MeanOver(lengths.mean().item(), n),
               "response_length/max": lengths.max().item()}
    metrics.update(result.metrics)
    metrics.update(apply_length_shaping(tr.cfg, tr.tokenizer, batch, result.scores))   # DAPO overlong / truncation
    return metrics


def logprobs(tr, batch: Batch) -> dict[str, float]:
    metrics = {}
    if tr.cfg.rollout.logprob_mode == "rollout":
        batch["old_logprob"] = batch["rollout_logprob"].float()
    else:
        old, ent = tr.actor.compute_logprobs(batch, with_entropy=True)
        batch["old_logprob"] = old
        mask = batch["response_mask"].float()
        metrics["actor/entropy"] = ((ent * mask).sum() / mask.sum().clamp(min=1)).item()
        if "rollout_logprob" in batch:
            diff = (old - batch["rollout_logprob"]).abs() * mask
            metrics["rollout/logprob_diff"] = (diff.sum() / mask.sum().clamp(min=1)).item()
            metrics["rollout/logprob_diff_max"] = diff.max().item()
        if tr.actor.routing_replay is not None:
            metrics.update(tr.actor.routing_replay.collect())   # moe/replay_mismatch_frac, moe/replay_agree_frac
    steer = tr.cfg.steering
    if steer.enable and steer.logprob_mode == "rollout_is":
        metrics.update(_rollout_is_weights(batch, steer.rollout_is_cap))
    if tr.cfg.algos.off_policy.enabled:
        metrics.update(_off_policy_weights(batch, tr.cfg.algos.off_policy))
    return metrics


def ref_logprobs(tr, batch: Batch) -> None:
    """The reference's log-probs (`ref_logprob`), onloaded for the pass when `ref.offload`."""
    with tr.reference.onloaded():
        batch["ref_logprob"], _ = tr.reference.compute_logprobs(batch)


def _rollout_is_weights(batch: Batch, cap: float) -> dict[str, float]:
    """Steered rollouts, unsteered actor (`steering.logprob_mode: rollout_is`): `old_logprob` was
    recomputed without steering; weight each token's pg term by min(exp(old - rollout), cap),
    folded multiplicatively into `token_weights` (kept alone as `rollout_is_weights`)."""
    from megatron_rl.steering.rollout_is import is_metrics, truncated_is_weights

    if "rollout_logprob" not in batch:
        raise RuntimeError("steering.logprob_mode=rollout_is needs the engine's rollout_logprob in the batch")
    mask = batch["response_mask"].float()
    w = truncated_is_weights(batch["old_logprob"], batch["rollout_logprob"], mask, cap)
    batch["rollout_is_weights"] = w
    _fold_token_weights(batch, w)
    return is_metrics(w, batch["old_logprob"], batch["rollout_logprob"], mask, cap)


def _off_policy_weights(batch: Batch, cfg) -> dict[str, float]:
    """`algos.off_policy.correction` (tis | mis): the weights of algos/off_policy.py, from the
    recomputed `old_logprob` against the engine's `rollout_logprob`, folded into `token_weights`."""
    from megatron_rl.algos.off_policy import off_policy_weights

    if "rollout_logprob" not in batch:
        raise RuntimeError(f"algos.off_policy.correction={cfg.correction} needs the engine's rollout_logprob "
                           "in the batch; the rollout engine returned none")
    out = off_policy_weights(cfg, batch["old_logprob"], batch["rollout_logprob"], batch["response_mask"])
    _fold_token_weights(batch, out.weights)
    st = out.stats
    metrics = {"off_policy/is_weight_mean": MeanOver(st.weight_mean, st.tokens),
               "off_policy/is_weight_max": st.weight_max,
               "off_policy/masked_frac": MeanOver(st.masked_frac, st.tokens)}
    if cfg.correction == "tis":
        metrics["off_policy/truncated_frac"] = MeanOver(st.truncated_frac, st.tokens)
    return metrics


def _fold_token_weights(batch: Batch, w: torch.Tensor) -> None:
    """Multiply `w` [B, R] into `token_weights` (set to `w` when there were none)."""
    tw = batch.get("token_weights")
    batch["token_weights"] = w if tw is None else tw.float() * w


def advantages(tr, batch: Batch) -> dict[str, float]:
    a = tr.cfg.algos
    mask = batch["response_mask"].float()
    token_rewards = batch["token_rewards"].float()
    metrics = {}
    if a.use_kl_in_reward and "ref_logprob" in batch:
        kl = kl_penalty(batch["old_logprob"], batch["ref_logprob"], a.kl_in_reward_kind) * mask
        beta = tr.kl_ctrl.value
        token_rewards = token_rewards - beta * kl
        # the global batch's mean sequence KL and size, identical on every DP rank: each rank's
        # controller takes the same step, as one DP=1 controller would
        seq_kl, n_seqs = dp_mean_count((kl.sum(-1) / mask.sum(-1).clamp(min=1)).tolist())
        tr.kl_ctrl.update(seq_kl, n_seqs)
        metrics.update({"reward/kl": seq_kl, "reward/kl_coef": beta})
    estimator = get_advantage_estimator(a.adv_estimator)
    adv, ret = estimator(token_rewards=token_rewards, response_mask=mask, group_index=batch.field("group"),
                         values=batch.get("values"), gamma=a.gamma, lam=a.lam, norm_by_std=a.norm_by_std,
                         eps=a.adv_eps, dp_group=dp_group())
    batch["advantages"], batch["returns"] = adv, ret
    valid = mask > 0
    metrics["critic/advantages_mean"] = adv[valid].mean().item() if valid.any() else 0.0
    metrics["critic/advantages_max"] = adv[valid].max().item() if valid.any() else 0.0
    return metrics


def update_actor(tr, batch: Batch, step: int) -> dict[str, float]:
    c = tr.cfg
    role = tr.plan.role("actor")
    steps = tr.actor.update(batch, c.algos, mini_batch_size=role.mini_batch_samples_per_rank, ppo_epochs=c.actor.ppo_epochs,
                            use_ref=tr.reference is not None, seed=c.trainer.seed + step)
    out = {"actor/optimizer_steps": float(len(steps))}
    for k in steps[0]:
        vals = [s[k] for s in steps]
        out[f"actor/{k}"] = sum(vals) / len(vals)
    out["actor/skipped_steps"] = float(sum(s.get("skipped", 0.0) for s in steps))   # step guard (update_steps)
    out.update(tr.actor.onload_metrics())     # perf/onload_overlapped_s, perf/onload_wait_s (CUDA, overlapped onload)
    if tr.actor.moe_metrics is not None:
        out.update(tr.actor.moe_metrics.collect())     # moe/aux_loss, moe/z_loss, moe/load_imbalance/*
    if tr.actor.routing_replay is not None:
        out.update(tr.actor.routing_replay.collect("update"))   # moe/replay_update_agree_frac, ..._mismatch_frac
    return out


def validate(tr) -> float:
    """Mean reward of greedy responses to the validation prompts."""
    scores = []
    for prompts in tr.data.val_batches():
        batch = tr.engine.generate(prompts, sampling_params(tr.cfg, 0, validation=True))
        result = tr.rewards.score_batch(batch, decode_responses(tr.tokenizer, batch),
                                        reward_model=tr.roles.reward_model)
        scores += result.scores
    return dp_mean(scores)
