#!/usr/bin/env python
"""Render one sample's response with its per-token weights as a coloured HTML page.

Blue tokens weigh less than 1, red tokens more (white = 1); hovering shows the weight.
The prompt is shown above, its context span (`token_weights.context_markers`) shaded.

From a model (VGR weights of the greedy response, or of `--response` text):
    python tools/render_token_weights.py --config configs/grpo_vgr_cpu.yaml --index 0 --out weights.html
From a JSON file {"tokens": [...], "weights": [...], "prompt": "..."} (e.g. reward weights):
    python tools/render_token_weights.py --json sample.json --out weights.html
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def colour(w: float, lo: float = 0.2, hi: float = 3.0) -> str:
    """White at 1; towards blue at `lo`, towards red at `hi` (log scale)."""
    import math

    if w >= 1:
        t = min(1.0, math.log(w) / math.log(hi)) if hi > 1 else 0.0
        return f"rgb(255,{int(255 * (1 - t))},{int(255 * (1 - t))})"
    t = min(1.0, math.log(w) / math.log(lo)) if 0 < lo < 1 and w > 0 else 1.0
    return f"rgb({int(255 * (1 - t))},{int(255 * (1 - t))},255)"


def render_html(tokens: list[str], weights: list[float], prompt: str = "", context: list[bool] | None = None,
                prompt_tokens: list[str] | None = None, title: str = "token weights") -> str:
    if len(tokens) != len(weights):
        raise ValueError(f"{len(tokens)} tokens but {len(weights)} weights")
    spans = "".join(f'<span title="{w:.3f}" style="background:{colour(w)}">{html.escape(t)}</span>'
                    for t, w in zip(tokens, weights))
    if prompt_tokens is not None and context is not None:
        shown = "".join(f'<span style="background:{"#ffe9a8" if c else "none"}">{html.escape(t)}</span>'
                        for t, c in zip(prompt_tokens, context))
    else:
        shown = html.escape(prompt)
    mean = sum(weights) / max(len(weights), 1)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto} pre{white-space:pre-wrap;"
            "font-family:monospace;border:1px solid #ccc;padding:1em}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><p>Prompt (context shaded):</p><pre>{shown}</pre>"
            f"<p>Response: {len(tokens)} tokens, mean weight {mean:.3f}, min {min(weights, default=0):.3f}, "
            f"max {max(weights, default=0):.3f} (blue &lt; 1 &lt; red; hover for values)</p>"
            f"<pre>{spans}</pre></body></html>")


def vgr_sample(config: str, index: int, response: str | None, overrides: list[str]) -> dict:
    """VGR weights of one validation prompt's response, computed with the config's actor."""
    import torch
    import transformers

    from megatron_rl.config import load_experiment_config
    from megatron_rl.data.collate import collate_prompts, pad_token_id
    from megatron_rl.data.dataset import RLDataset
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.protocol import SamplingParams
    from megatron_rl.token_weights.phase import VGRWeights
    from megatron_rl.trainer.policy import Policy

    cfg = load_experiment_config(config, overrides)
    init_distributed()
    tok = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    files = cfg.data.val_files or cfg.data.train_files
    prompts = collate_prompts([RLDataset(files, tok, cfg.data)[index]], pad_token_id(tok))
    model = load_checkpoint(cfg.model.path, dtype=cfg.model.dtype, layer_spec=cfg.model.layer_spec).eval()
    if response is None:
        batch = NativeEngine(model, tok).generate(prompts, SamplingParams(greedy=True, n=1,
                                                                          max_new_tokens=cfg.rollout.max_new_tokens))
    else:
        ids = tok(response, add_special_tokens=False)["input_ids"]
        batch = prompts
        batch["response_ids"] = torch.tensor([ids])
        batch["response_mask"] = torch.ones(1, len(ids))
    tw = cfg.token_weights
    tw.source = "vgr"
    phase = VGRWeights(tw, Policy(model, micro_batch_size=1), tok)
    phase(None, batch)
    keep = batch["response_mask"][0] > 0
    ctx, _ = phase.find_context(batch["prompt_ids"], batch["prompt_mask"])
    real = batch["prompt_mask"][0] > 0
    return {"tokens": [phase.find_context.piece(int(t)) for t in batch["response_ids"][0][keep]],
            "weights": batch["token_weights"][0][keep].tolist(),
            "prompt_tokens": [phase.find_context.piece(int(t)) for t in batch["prompt_ids"][0][real]],
            "context": (ctx[0][real] > 0).tolist()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="a file with tokens, weights (and optionally prompt)")
    ap.add_argument("--config", help="an experiment YAML: its actor computes VGR weights")
    ap.add_argument("--index", type=int, default=0, help="validation prompt to use (--config)")
    ap.add_argument("--response", help="score this response text instead of the greedy one (--config)")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (--config)")
    args = ap.parse_args(argv)
    if bool(args.json) == bool(args.config):
        ap.error("give exactly one of --json or --config")
    sample = json.loads(Path(args.json).read_text()) if args.json else vgr_sample(
        args.config, args.index, args.response, args.overrides)
    page = render_html(sample["tokens"], sample["weights"], sample.get("prompt", ""), sample.get("context"),
                       sample.get("prompt_tokens"), title=f"token weights: {args.json or args.config}")
    Path(args.out).write_text(page, encoding="utf-8")
    if args.config:
        Path(args.out).with_suffix(".json").write_text(json.dumps(sample))
    print(f"wrote {args.out} ({len(sample['tokens'])} response tokens)")


if __name__ == "__main__":
    main()
