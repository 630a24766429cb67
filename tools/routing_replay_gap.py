"""Rollout/training log-prob gap with and without MoE routing replay (`model.moe.routing_replay`).

    python tools/routing_replay_gap.py            # CPU, about a minute; the table in docs/moe.md

A tiny random Qwen3-MoE (4 MoE layers, hidden 64, 8 experts top-2) generates with the native
engine (which records every fed token's experts) from a copy of the trainer's weights that
differs as an engine's would: its router weights perturbed by a relative amount, or every
weight rounded to bf16 (an engine that holds a bf16 copy and computes in fp32). The trainer
then recomputes the rollout tokens' log-probs with replay (the recorded experts forced) and
without; `mismatch` is `moe/replay_mismatch_frac` (tokens whose own routing differs from the
recorded one in some layer), `agree` is `moe/replay_agree_frac` (tokens whose replayed
routing equals the recording in every layer), gaps are `rollout/logprob_diff` (mean |old -
rollout| over response tokens).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def engine_copy(hf: str, mode: str, amount: float):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.moe_config import MoEConfig

    model = load_checkpoint(hf, layer_spec="local", moe=MoEConfig(routing_replay=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if mode == "bf16":
                p.copy_(p.to(torch.bfloat16).float())
            elif "router" in n:
                p.add_(torch.randn(p.shape, generator=g) * amount * p.std())
    return model


def measure(hf: str, actor, mode: str, amount: float, rows: int, new_tokens: int) -> dict:
    from megatron_rl.data.batch import Batch
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams
    from megatron_rl.trainer.policy import Policy

    engine = NativeEngine(engine_copy(hf, mode, amount), types.SimpleNamespace(eos_token_id=95, pad_token_id=0))
    ids = torch.randint(2, 90, (rows, 8), generator=torch.Generator().manual_seed(5))
    batch = engine.generate(Batch({"prompt_ids": ids, "prompt_mask": torch.ones_like(ids)}),
                            SamplingParams(n=1, max_new_tokens=new_tokens, temperature=1.0, seed=3, ignore_eos=True))
    mask = batch["response_mask"]
    out = {}
    for name, replay in (("replay", True), ("no_replay", False)):
        policy = Policy(actor, micro_batch_size=8, routing_replay=replay)
        lp, _ = policy.compute_logprobs(batch)
        out[name] = float(((lp - batch["rollout_logprob"]).abs() * mask).sum() / mask.sum())
        if replay:
            out.update(policy.routing_replay.collect())
    return out


def main(argv=None) -> None:
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import init_distributed
    from tests.helpers import make_tiny_hf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    init_distributed()
    hf = make_tiny_hf(Path(tempfile.mkdtemp()) / "hf", "qwen3_moe", tie=False, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[])
    actor = load_checkpoint(hf, layer_spec="local", moe=MoEConfig(routing_replay=True))
    print("| engine differs by | mismatch | agree | logprob_diff, no replay | logprob_diff, replay | ratio |")
    print("|---|---|---|---|---|---|")
    for mode, amount in (("router", 0.0), ("router", 0.01), ("router", 0.03), ("router", 0.1), ("bf16", 0.0)):
        r = measure(hf, actor, mode, amount, args.rows, args.new_tokens)
        label = "bf16-rounded weights" if mode == "bf16" else (f"router weights x {amount} noise" if amount
                                                               else "nothing")
        ratio = r["no_replay"] / r["replay"] if r["replay"] > 0 else float("nan")
        print(f"| {label} | {r['moe/replay_mismatch_frac']:.3f} | {r['moe/replay_agree_frac']:.3f} | "
              f"{r['no_replay']:.2e} | {r['replay']:.2e} | {ratio:.1f} |", flush=True)


if __name__ == "__main__":
    main()
