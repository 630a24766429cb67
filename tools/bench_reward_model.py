"""Reward-model pass on one GPU: a random `LlamaForSequenceClassification` (one label) of a
SmolLM2-135M shape and of a ~1B Llama shape, bf16, sdpa spec, scoring 128 sequences of 512
tokens (micro-batch 16) through `megatron_rl.rewards.reward_model`; with and without
`offload`. Prints a table: score seconds (median of 3 after a warm-up), sequences/s, peak
GPU memory, resident weight bytes between passes, and the max |bf16 - fp32 reference| score
difference on 8 rows (transformers' own model in fp32).

    python3 tools/bench_reward_model.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


def make_rm(name: str, out: Path) -> Path:
    import transformers

    if (out / "config.json").exists():
        return out
    cfg = transformers.LlamaConfig(**SHAPES[name], num_labels=1, pad_token_id=0, max_position_embeddings=2048,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(out, safe_serialization=True)
    return out


def hf_scores(path: Path, ids, am) -> torch.Tensor:
    import transformers

    m = transformers.LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        logits = m(input_ids=ids.cuda(), attention_mask=am.cuda()).logits[:, 0].float().cpu()
    del m
    torch.cuda.empty_cache()
    return logits


def bench(name: str, offload: bool) -> dict:
    from megatron_rl.rewards.reward_model import load_reward_model

    path = make_rm(name, Path(f"/tmp/rm_{name}"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SHAPES[name]["vocab_size"], (128, 512), generator=g)
    am = torch.ones_like(ids)
    lengths = torch.randint(64, 513, (128,), generator=g)
    for i, n in enumerate(lengths.tolist()):          # right padding, different lengths
        ids[i, n:], am[i, n:] = 0, 0
    torch.cuda.reset_peak_memory_stats()
    rm = load_reward_model(path, micro_batch_size=16, dtype="bfloat16", layer_spec="sdpa", offload=offload,
                           tokenizer=False)
    rm.score(ids, am)                                  # warm-up
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        scores = rm.score(ids, am)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    resident = sum(p.untyped_storage().nbytes() for c in rm.chunks for p in c.parameters() if p.is_cuda)
    ref = hf_scores(path, ids[:8, :256], am[:8, :256]) if not offload else None
    diff = (rm.score(ids[:8, :256], am[:8, :256]) - ref).abs().max().item() if ref is not None else float("nan")
    out = {"model": name, "offload": offload, "s": statistics.median(times), "peak": torch.cuda.max_memory_allocated() / 2**30,
           "resident": resident, "diff": diff, "finite": bool(torch.isfinite(scores).all())}
    del rm
    torch.cuda.empty_cache()
    return out


def main() -> int:
    from megatron_rl.parallel import init_distributed

    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    init_distributed()
    rows = [bench(n, off) for n in SHAPES for off in (False, True)]
    print("| reward model | offload | score s (128 x <=512) | sequences/s | peak GiB | weights on GPU between passes | "
          "max abs diff vs HF fp32 (8 rows) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['offload']} | {r['s']:.3f} | {128 / r['s']:.0f} | {r['peak']:.2f} | "
              f"{r['resident'] / 2**30:.3f} GiB | {r['diff']:.4f} |")
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
