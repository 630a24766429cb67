"""GRPO steps on one GPU whose reward is a sequence-classification reward model
(`reward.model`, `reward.combine: {model: 1.0}`): a SmolLM2-135M-shaped and a ~1B-shaped
random `LlamaForSequenceClassification` on the policy's vocabulary (the ~1B Llama policy of
`tools/gpu_trainer_smoke.py`, bf16, sdpa, native engine, 16 prompts x n=8 x 64 tokens);
prints each step's phase split (the reward-model pass is `timing/reward`).

    python3 tools/gpu_reward_model_step.py      # needs CUDA; writes under /tmp/mrl_smoke
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gpu_trainer_smoke import LLAMA_1B, ROOT, WORDS, assets, base_overrides, fit  # noqa: E402

RM_SHAPES = {"smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                  num_key_value_heads=3),
             "llama-1b": {k: v for k, v in LLAMA_1B.items() if k != "max_position_embeddings"}}
PHASES = ("timing/step", "timing/rollout", "timing/reward", "timing/logprob", "timing/update")


def reward_model(name: str, policy: Path) -> Path:
    import transformers

    out = ROOT / f"rm_{name}"
    if not (out / "config.json").exists():
        cfg = transformers.LlamaConfig(**RM_SHAPES[name], max_position_embeddings=2048, num_labels=1,
                                       vocab_size=len(WORDS) + 16, pad_token_id=1, tie_word_embeddings=True,
                                       architectures=["LlamaForSequenceClassification"])
        torch.manual_seed(1)
        transformers.LlamaForSequenceClassification(cfg).save_pretrained(out, safe_serialization=True)
    for f in policy.iterdir():                      # the policy's tokenizer: `template: tokens`
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    model, data = assets()
    print("| reward model | step | " + " | ".join(PHASES) + " | reward/mean |")
    print("|---|---:|" + "---:|" * (len(PHASES) + 1))
    for name in RM_SHAPES:
        run_dir = ROOT / f"run_rm_{name}"
        tr = fit(base_overrides(model, data, run_dir) + [
            f"reward.model.path={reward_model(name, model)}", "reward.model.micro_batch_size=32",
            "reward.model.template=tokens", "reward.combine={model: 1.0, gsm8k: 0.0}"])
        for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()):
            cells = [f"{r[k]:.3f}" if k in r else "-" for k in PHASES + ("reward/mean",)]
            print(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
        del tr
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
