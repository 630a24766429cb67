"""Print an SAE's config and, with a model, the tokens each feature's decoder row promotes.

    python tools/inspect_sae.py PATH [--sae-id ID] [--model HF_DIR] [--features 1,2,3] [--topk 10]

The promoted tokens are a logit-lens reading: W_U (W_dec[f] * final_norm_weight), the direct
effect of adding the feature at the last layer (the norm's scale, not its normalisation). Use it
to pick `steering.feature_idxs` and to sanity-check that an SAE matches the model (d_in).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

UNEMBED_KEYS = ("lm_head.weight", "model.embed_tokens.weight")
FINAL_NORM_KEY = "model.norm.weight"


def describe(sae) -> list[str]:
    norms = sae.W_dec.float().norm(dim=-1)
    lines = [f"SAE {sae.source}",
             f"  architecture={sae.architecture} d_in={sae.d_in} d_sae={sae.d_sae} dtype={sae.dtype}",
             f"  hook_name={sae.hook_name} -> steer layer (0-indexed output) {sae.hook_layer}",
             f"  normalize_activations={sae.normalize_activations} apply_b_dec_to_input={sae.apply_b_dec_to_input}"]
    if "k" in sae.cfg:
        lines.append(f"  k={sae.cfg['k']} rescale_acts_by_decoder_norm={sae.cfg.get('rescale_acts_by_decoder_norm', False)}")
    lines.append(f"  |W_dec| rows: min {norms.min():.4g} mean {norms.mean():.4g} max {norms.max():.4g}")
    return lines


def read_unembedding(hf_dir) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(W_U [vocab, hidden], final norm weight or None, hidden size) from an HF checkpoint."""
    from megatron_rl.models.hf_io import HFTensorReader

    reader = HFTensorReader(hf_dir)
    hidden = json.loads((Path(hf_dir) / "config.json").read_text())["hidden_size"]
    key = next((k for k in UNEMBED_KEYS if k in reader), None)
    if key is None:
        raise KeyError(f"{hf_dir}: none of {UNEMBED_KEYS} in the checkpoint")
    norm = reader.get(FINAL_NORM_KEY).float() if FINAL_NORM_KEY in reader else None
    return reader.get(key).float(), norm, hidden


def promoted_tokens(sae, w_u: torch.Tensor, features, topk: int = 10, norm_weight=None):
    """{feature: [(token_id, score), ...]} of the `topk` largest W_U (W_dec[f] * norm)."""
    rows = sae.W_dec[list(features)].float()
    if norm_weight is not None:
        rows = rows * norm_weight
    scores = rows @ w_u.T                                    # [F, vocab]
    vals, idx = scores.topk(min(topk, scores.shape[-1]), dim=-1)
    return {f: list(zip(idx[i].tolist(), vals[i].tolist())) for i, f in enumerate(features)}


def _token_namer(hf_dir):
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(hf_dir)
        return lambda i: repr(tok.convert_ids_to_tokens(i))
    except Exception as e:      # no tokenizer files in the directory
        print(f"(no tokenizer in {hf_dir}: {type(e).__name__}; printing token ids)")
        return lambda i: f"#{i}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="sae-lens SAE directory or release id")
    ap.add_argument("--sae-id", default=None)
    ap.add_argument("--model", default=None, help="HF checkpoint directory (unembedding + tokenizer)")
    ap.add_argument("--features", default="0,1,2,3,4", help="comma-separated feature indices")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--no-norm", action="store_true", help="skip the final norm's scale")
    args = ap.parse_args(argv)

    from megatron_rl.steering import load_sae

    sae = load_sae(args.path, args.sae_id)
    print("\n".join(describe(sae)))
    if args.model is None:
        return 0
    features = [int(f) for f in args.features.split(",") if f.strip()]
    bad = [f for f in features if not 0 <= f < sae.d_sae]
    if bad:
        raise SystemExit(f"--features {bad} out of range for d_sae={sae.d_sae}")
    w_u, norm, hidden = read_unembedding(args.model)
    sae.check_d_in(hidden)
    name = _token_namer(args.model)
    for f, toks in promoted_tokens(sae, w_u, features, args.topk, None if args.no_norm else norm).items():
        print(f"feature {f}: " + ", ".join(f"{name(i)} {s:.3g}" for i, s in toks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
