"""Write what configs/qwen3_moe_tiny_cpu.yaml needs: a tiny random Qwen3-MoE (4 layers,
hidden 64, 8 experts top-2) with a word-level tokenizer, prompts, and the reward file.

    python tools/make_tiny_moe_run.py            # -> .cache/demo/tiny-qwen3-moe, data/generated/moe_tiny
    megatron-rl train --config configs/qwen3_moe_tiny_cpu.yaml
    torchrun --nproc_per_node 2 -m megatron_rl.cli train --config configs/qwen3_moe_tiny_cpu.yaml model.ep=2

The task is learnable from scratch: the reward is the fraction of response words that are
"yes" (`tools/tiny_moe_reward.py`), so GRPO only has to raise one token's probability.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "yes no maybe one two three four five six seven eight nine zero red blue green say a word please".split()
SPECIALS = 7                                            # tests.helpers.write_word_tokenizer's special tokens


def main(argv=None) -> None:
    from megatron_rl.data.writers import write_jsonl
    from tests.helpers import make_tiny_hf, write_word_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / ".cache/demo/tiny-qwen3-moe"))
    ap.add_argument("--data-dir", default=str(ROOT / "data/generated/moe_tiny"))
    args = ap.parse_args(argv)
    make_tiny_hf(args.model_dir, "qwen3_moe", tie=False, seed=0, vocab_size=SPECIALS + len(WORDS),
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[])
    write_word_tokenizer(args.model_dir, WORDS)
    prompts = ["say a word", "say a word please", "one two three", "red blue green", "say yes or no"]
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 64), ("val", 8)):
        write_jsonl(data / f"{split}.jsonl", [{"prompt": prompts[i % len(prompts)], "ground_truth": "yes"}
                                              for i in range(n)])
    print(f"wrote {args.model_dir} and {data}")


if __name__ == "__main__":
    main()
