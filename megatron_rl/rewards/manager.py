"""Score a list of responses with the configured rewards.

    manager = RewardManager(cfg.reward)
    result = manager.score(responses, samples)        # or manager.score_batch(batch, responses)
    result.scores, result.extras, result.token_weights, result.metrics

A dict return's extra keys are per-sample info and, where numeric (bool/int/float), metrics
`reward_extra/<key>/mean` over the samples that returned them (verl's reward_extra_info).
Rows routed to a reward model (verl's `reward_model.style: model`) go through rewards/combine.py.

A failing or timed-out call gets `fallback_score`, is counted (`reward/failures`,
`reward/timeouts`) and logged with the sample's uid; the step goes on. A NaN or
infinite score is a bug, not bad luck: it raises with the uid.
"""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from megatron_rl.logging.values import MeanOver, StdOver, Summed
from megatron_rl.rewards.config import RewardConfig
from megatron_rl.rewards.loader import load_function
from megatron_rl.rewards.pool import FAIL, OK, TIMEOUT, WorkerPool
from megatron_rl.rewards.registry import REWARDS, call_reward, get_reward
from megatron_rl.rewards.verl_default import NAME as VERL_DEFAULT, check_source

log = logging.getLogger(__name__)


_CUSTOM: dict[str, str] = {}


def register_custom_functions(custom: dict[str, str]) -> None:
    """Register config-named functions; a name registered earlier by the config
    (e.g. a second run in the same process) is replaced, a built-in one is not."""
    for name, spec in custom.items():
        if _CUSTOM.get(name) is not None and name in REWARDS:
            del REWARDS[name]
        REWARDS.register(name)(load_function(spec))
        _CUSTOM[name] = spec


def _init_worker(custom: dict[str, str], modules: list[str]) -> None:
    """Process-worker start-up: import the modules whose decorators registered rewards in
    the parent (e.g. `megatron_rl.agent.reward`), then load the custom functions."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - a reward from it then fails per call, counted
            log.warning("reward worker could not import %s (%s)", module, e)
    register_custom_functions(custom)


def _registering_modules() -> list[str]:
    mods = {getattr(fn, "__module__", None) for fn in REWARDS.values()}
    return sorted(m for m in mods if m and m != "__main__" and not m.startswith("_megatron_rl_reward_"))


def _score_one(name: str, response: str, sample: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    # Runs in a worker: resolves by name so that nothing but plain data is pickled.
    return call_reward(get_reward(name), response, sample, kwargs)


@dataclass
class RewardResult:
    scores: list[float]
    extras: list[dict[str, Any]]                       # per-sample info from dict returns
    token_weights: list[Any | None]                    # per-sample weights, or None
    reward_names: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


class RewardManager:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        register_custom_functions(cfg.custom_functions)
        for name in {cfg.name, *cfg.data_source_map.values()}:
            get_reward(name)                           # unknown names fail at start-up
        self.pool = WorkerPool(cfg.executor, cfg.num_workers, cfg.timeout_s, cfg.mp_start_method,
                               initializer=_init_worker,
                               initargs=(dict(cfg.custom_functions), _registering_modules()))
        from megatron_rl.rewards.combine import EXTERNAL, check_combine
        check_combine(cfg)
        for name in cfg.combine:
            if name not in EXTERNAL:
                get_reward(name)
        self.judge = None
        if cfg.judge.url:
            from megatron_rl.rewards.judge import Judge
            self.judge = Judge(cfg.judge)

    def reward_name(self, sample: dict[str, Any]) -> str:
        cfg = self.cfg
        source = sample.get("data_source")
        if not cfg.select_by_data_source or source is None:
            return cfg.name
        name = cfg.data_source_map.get(source, source)
        if name not in REWARDS:
            raise ValueError(f"sample {sample.get('uid', '?')}: no reward for data_source '{source}'; "
                             f"map it in reward.data_source_map or register a reward of that name "
                             f"(registered: {sorted(REWARDS)})")
        return name

    def kwargs_for(self, name: str) -> dict[str, Any]:
        kwargs = dict(self.cfg.kwargs.get(name, {}))
        if name == "format":
            kwargs.setdefault("pattern", self.cfg.format_pattern)
        return kwargs

    def score(self, responses: Sequence[str], samples: Sequence[dict[str, Any]],
              model_scorer=None) -> RewardResult:
        """`model_scorer(rows) -> [float]` scores rows with the reward model (the role, built
        by the trainer); `reward.combine` or `reward_model.style: model` rows use rewards/combine.py."""
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses for {len(samples)} samples")
        from megatron_rl.rewards.combine import needs_components, score_components
        if needs_components(self.cfg, samples, model_scorer):
            return score_components(self, responses, samples, model_scorer)
        return self.score_rules(responses, samples, [self.reward_name(s) for s in samples])

    def score_rules(self, responses: Sequence[str], samples: Sequence[dict[str, Any]],
                    names: Sequence[str]) -> RewardResult:
        """Each row by the rule reward `names[i]`."""
        check_routable(names, samples)
        # a sample's processed images (data/multimodal.py) stay here: rule rewards score text, and
        # pickling pixel tensors to every reward worker would cost more than the scoring
        tasks = [(n, r, {k: v for k, v in s.items() if k != "images"}, self.kwargs_for(n))
                 for n, r, s in zip(names, responses, samples)]
        outcomes = self.pool.map(_score_one, tasks)

        scores, extras, weights = [], [], []
        failures = timeouts = 0
        for (status, value), name, sample in zip(outcomes, names, samples):
            uid = sample.get("uid", "?")
            if status != OK:
                failures += status == FAIL
                timeouts += status == TIMEOUT
                why = value if status == FAIL else f"timed out after {self.cfg.timeout_s}s"
                log.warning("reward '%s' on sample %s: %s; using fallback_score=%s", name, uid, why,
                            self.cfg.fallback_score)
                value = self.cfg.fallback_score
            score, extra, tw = _unpack(value, name, uid)
            scores.append(score)
            extras.append(extra)
            weights.append(tw)
        metrics = _metrics(scores, names, samples)
        metrics.update(extra_metrics(extras))
        metrics.update({"reward/failures": Summed(failures), "reward/timeouts": Summed(timeouts)})
        return RewardResult(scores, extras, weights, names, metrics)

    def score_batch(self, batch, responses: Sequence[str], reward_model=None) -> RewardResult:
        """Score a rolled-out `Batch`: sets `token_rewards` [B, R] (the score on the last
        response token), `token_weights` when any reward returned them (1.0 elsewhere),
        and `score`/`reward_extras` in each sample record. `reward_model`: the frozen
        reward-model role (rewards/reward_model.py), which scores the rows routed to it."""
        from megatron_rl.algos.token_weights import align_token_weights
        from megatron_rl.rewards.token_rewards import to_token_rewards

        scorer = None
        if reward_model is not None:
            def scorer(rows):
                return reward_model.score_rows(batch, rows, responses)
        result = self.score(responses, batch.samples, scorer)
        mask = batch["response_mask"]
        batch["token_rewards"] = to_token_rewards(result.scores, mask)
        if any(w is not None for w in result.token_weights):
            rows = [w if w is not None else [] for w in result.token_weights]
            try:
                batch["token_weights"] = align_token_weights(rows, mask.shape[1], dtype=batch["token_rewards"].dtype)
            except ValueError as e:             # name the sample, not just the row (only on the error path)
                raise ValueError(f"{e}; {_first_nonfinite(rows, batch.samples)}") from None
        for sample, score, extra in zip(batch.samples, result.scores, result.extras):
            sample["score"] = score
            sample["reward_extras"] = extra
        return result

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unpack(value: Any, name: str, uid: str) -> tuple[float, dict[str, Any], Any | None]:
    extra: dict[str, Any] = {}
    token_weights = None
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"reward '{name}' returned a dict without 'score' for sample {uid}: {sorted(value)}")
        extra = {k: v for k, v in value.items() if k not in ("score", "token_weights")}
        token_weights = value.get("token_weights")
        value = value["score"]
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward '{name}' returned {type(value).__name__} for sample {uid}; "
                        f"expected a float or a dict with 'score'") from None
    if not math.isfinite(score):
        raise ValueError(f"reward '{name}' returned {score} for sample {uid}")
    return score, extra, token_weights


def check_routable(names: Sequence[str], samples: Sequence[dict[str, Any]]) -> None:
    """Before any call: a data_source `verl_default` has no rule for is an error naming the
    sample (not a fallback score that hides it). Model-routed rows never get here
    (rewards/combine.py sends them to the reward model or judge)."""
    for name, sample in zip(names, samples):
        if name == VERL_DEFAULT:
            check_source(sample.get("data_source"), sample.get("uid", "?"))


def extra_metrics(extras: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`reward_extra/<key>/mean` of each numeric extra key, count-aware (a key only some
    samples return is the mean over those)."""
    values: dict[str, list[float]] = {}
    for extra in extras:
        for k, v in extra.items():
            if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
                values.setdefault(k, []).append(float(v))
    return {f"reward_extra/{k}/mean": MeanOver.of(v) for k, v in values.items()}


def _first_nonfinite(rows, samples) -> str:
    for i, row in enumerate(rows):
        for t, v in enumerate(row):
            if not math.isfinite(float(v)):
                return (f"reward function returned token_weights for sample {i} "
                        f"(uid {samples[i].get('uid', '?')}) with a non-finite value at response token {t}")
    return "no non-finite value found in the rows as returned"


def _metrics(scores: list[float], names: list[str], samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Count-aware reward statistics: under data parallelism `reduce_metrics` pools them over the
    samples of every rank (a source only some ranks drew is the mean over its own samples).

    `reward/<source>/mean` is emitted for every source on this rank whenever some sample carries a
    `data_source` (untagged ones as `unknown`): a rank cannot know whether other ranks drew other
    sources, so one source alone is not skipped.
    """
    n = len(scores)
    if n == 0:
        return {}
    out = {"reward/mean": MeanOver.of(scores), "reward/std": StdOver.of(scores),
           "reward/max": max(scores), "reward/min": min(scores)}
    by_source: dict[str, list[float]] = {}
    for s, sample in zip(scores, samples):
        by_source.setdefault(str(sample.get("data_source") or ""), []).append(s)
    if set(by_source) != {""}:
        for source, vals in by_source.items():
            out[f"reward/{source or 'unknown'}/mean"] = MeanOver.of(vals)
    return out
