"""Which components score a row, and their weighted sum (`reward.combine`).

A component is a registered rule reward (by name), `model` (the sequence-classification
reward model) or `judge` (the LLM judge). Without `reward.combine` a row has one
component: `model` when its verl `reward_model.style` is `model` (the judge when no
reward model is configured), else its rule (`reward.name` / `data_source`). With
`reward.combine: {gsm8k: 1.0, model: 0.5}` every row is `1.0 * gsm8k + 0.5 * model`.
Each component's mean is logged as `reward/components/<name>`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from megatron_rl.logging.values import MeanOver, Summed

MODEL, JUDGE = "model", "judge"
EXTERNAL = (MODEL, JUDGE)


def style_of(sample: dict[str, Any]) -> str:
    """verl's `reward_model.style` ("rule" when absent); data/verl_schema.py checks the values."""
    rm = sample.get("reward_model")
    style = rm.get("style") if isinstance(rm, dict) else None
    return style or "rule"


def check_combine(cfg) -> None:
    """`reward.combine` names only configured components; `model`/`judge` need their section."""
    for name, w in cfg.combine.items():
        if not isinstance(w, (int, float)):
            raise ValueError(f"reward.combine.{name}: weight must be a number, got {w!r}")
    if MODEL in cfg.combine and not cfg.model.path:
        raise ValueError("reward.combine has 'model' but reward.model.path is empty")
    if JUDGE in cfg.combine and not cfg.judge.url:
        raise ValueError("reward.combine has 'judge' but reward.judge.url is empty")


def model_component(cfg) -> str:
    """Who scores a `reward_model.style: model` row without `reward.combine`."""
    if cfg.model.path:
        return MODEL
    if cfg.judge.url:
        return JUDGE
    raise ValueError("a row has reward_model.style=model but neither reward.model.path nor reward.judge.url "
                     "is set; configure a reward model or a judge")


def row_components(cfg, sample: dict[str, Any], rule_name: Callable[[dict], str]) -> dict[str, float]:
    """{component: weight} for one row."""
    if cfg.combine:
        return {k: float(v) for k, v in cfg.combine.items()}
    if style_of(sample) == "model":
        return {model_component(cfg): 1.0}
    return {rule_name(sample): 1.0}


def rows_needing(component: str, recipes: Sequence[dict[str, float]]) -> list[int]:
    return [i for i, r in enumerate(recipes) if component in r]


def weighted_sum(recipes: Sequence[dict[str, float]], values: Sequence[dict[str, float]]) -> list[float]:
    """Row i: sum over its components of weight * value (values[i] holds each component's score)."""
    return [sum(w * vals[name] for name, w in rec.items()) for rec, vals in zip(recipes, values)]


def component_metrics(values: Sequence[dict[str, float]]) -> dict[str, MeanOver]:
    """`reward/components/<name>`: the mean over the rows that component scored (count-aware)."""
    by: dict[str, list[float]] = {}
    for vals in values:
        for name, v in vals.items():
            by.setdefault(name, []).append(v)
    return {f"reward/components/{name}": MeanOver.of(v) for name, v in by.items()}


def needs_components(cfg, samples: Sequence[dict[str, Any]], model_scorer) -> bool:
    """The component path: `reward.combine` is set, a row is routed to a model, or a reward
    model is configured (its scorer must run on every rank: its passes are collective)."""
    return bool(cfg.combine) or model_scorer is not None or any(style_of(s) == "model" for s in samples)


def score_components(manager, responses: Sequence[str], samples: Sequence[dict[str, Any]], model_scorer):
    """The `RewardResult` of rows scored by their components (module docstring). Rule
    components skip `reward_model.style: model` rows (verl's model rows have no rule truth)."""
    from megatron_rl.rewards.manager import RewardResult

    cfg = manager.cfg
    recipes = []
    for s in samples:
        rec = row_components(cfg, s, manager.reward_name)
        if style_of(s) == "model":
            rec = {k: w for k, w in rec.items() if k in EXTERNAL}
        recipes.append(rec)
    values: list[dict[str, float]] = [{} for _ in samples]
    extras: list[dict[str, Any]] = [{} for _ in samples]
    weights: list[Any] = [None] * len(samples)
    metrics: dict[str, float] = {"reward/failures": Summed(0), "reward/timeouts": Summed(0)}
    rule_names = sorted({k for r in recipes for k in r if k not in EXTERNAL})
    for name in rule_names:
        rows = rows_needing(name, recipes)
        res = manager.score_rules([responses[i] for i in rows], [samples[i] for i in rows], [name] * len(rows))
        for j, i in enumerate(rows):
            values[i][name] = res.scores[j]
            extras[i].update(res.extras[j])
            if weights[i] is None:
                weights[i] = res.token_weights[j]
        for k in ("reward/failures", "reward/timeouts"):
            metrics[k] = Summed(metrics[k] + res.metrics[k])
    if model_scorer is not None or any(MODEL in r for r in recipes):
        if model_scorer is None:
            raise ValueError("reward.model.path is set but no reward-model role scored the batch "
                             "(pass the role to RewardManager.score_batch)")
        rows = rows_needing(MODEL, recipes)
        scores = model_scorer(rows)          # called on every rank, even with no rows: collective
        for i, v in zip(rows, scores):
            values[i][MODEL] = float(v)
    rows = rows_needing(JUDGE, recipes)
    if rows:
        scores, judge_metrics = manager.judge.score([responses[i] for i in rows], [samples[i] for i in rows])
        for i, v in zip(rows, scores):
            values[i][JUDGE] = v
        metrics.update(judge_metrics)
    elif manager.judge is not None:
        metrics.update(manager.judge.empty_metrics())
    total = weighted_sum(recipes, values)
    names = ["+".join(sorted(r)) for r in recipes]
    from megatron_rl.rewards.manager import _metrics
    out = _metrics(total, names, samples)
    out.update(metrics)
    out.update(component_metrics(values))
    for i, vals in enumerate(values):
        extras[i]["components"] = dict(vals)
    return RewardResult(total, extras, weights, names, out)
