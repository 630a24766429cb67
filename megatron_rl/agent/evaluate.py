"""Greedy evaluation of a search agent on the validation prompts: exact match and
how the agent got there (tool-call rate, finished fraction, invalid actions).

The trainer's validation reports only the mean reward; a tiny run's before/after
comparison also needs to know whether the policy searched at all. Runs with the
same config as training (and its checkpoint, via `trainer.resume`):

    python -m megatron_rl.agent.evaluate --config configs/search_agent.yaml \
        [--out eval.json] [dotted.key=value ...]
"""
from __future__ import annotations

import argparse
import json

from megatron_rl.agent.metrics import agent_metrics


def summarise(samples: list[dict], scores: list[float]) -> dict[str, float]:
    """Exact match (reward == 1), tool-call rate (samples with >= 1 tool call) and the
    batch's agent metrics, turned into per-sample rates."""
    n = len(samples)
    if n == 0:
        return {"eval/n": 0.0}
    m = agent_metrics(samples)
    return {"eval/n": float(n),
            "eval/exact_match": sum(float(s) == 1.0 for s in scores) / n,
            "eval/reward_mean": sum(scores) / n,
            "eval/tool_call_rate": sum(s["n_tool_calls"] > 0 for s in samples) / n,
            "eval/tool_calls_per_sample": m["agent/search_calls"] / n,
            "eval/tool_errors": m["agent/tool_errors"],
            "eval/invalid_actions_per_sample": m["agent/invalid_actions"] / n,
            "eval/finished_frac": m["agent/finished_frac"],
            "eval/turns_mean": m["agent/turns_mean"],
            "eval/response_length_mean": m["agent/response_length_mean"]}


def evaluate(trainer) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-sample records) of greedy agent rollouts on `trainer.data.val_batches()`."""
    from megatron_rl.trainer.phases import decode_responses, sampling_params

    samples, scores = [], []
    for prompts in trainer.data.val_batches():
        batch = trainer.engine.generate(prompts, sampling_params(trainer.cfg, 0, validation=True))
        if "turns" not in batch.samples[0]:
            raise RuntimeError(f"engine {type(trainer.engine).__name__} is not an AgentRolloutEngine; "
                               f"set agent.enable=true")
        result = trainer.rewards.score(decode_responses(trainer.tokenizer, batch), batch.samples)
        samples += batch.samples
        scores += list(result.scores)
    records = [{"uid": s.get("uid"), "ground_truth": s.get("ground_truth"), "answer": s.get("answer"),
                "reward": float(r), "n_tool_calls": s["n_tool_calls"], "stop_reason": s["stop_reason"],
                "queries": [t.get("query") for t in s["turns"] if t.get("action") not in ("answer", "invalid")]}
               for s, r in zip(samples, scores)]
    return summarise(samples, scores), records


def main(argv=None) -> int:
    from megatron_rl.config import load_experiment_config
    from megatron_rl.models.loading import load_mcore_checkpoint
    from megatron_rl.trainer.checkpoint import find_checkpoint
    from megatron_rl.trainer.main import build_trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", help="write metrics and per-sample records here (JSON)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    cfg = load_experiment_config(args.config, args.overrides)
    trainer = build_trainer(cfg)
    ckpt = find_checkpoint(cfg.logging.run_dir, cfg.trainer.resume)
    if ckpt is not None:    # weights only: no optimizer needed to evaluate
        load_mcore_checkpoint(trainer.actor.chunks, ckpt)
    metrics, records = evaluate(trainer)
    metrics["eval/checkpoint_step"] = float(ckpt.name.split("_")[-1]) if ckpt is not None else 0.0
    print(json.dumps(metrics, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"metrics": metrics, "samples": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
