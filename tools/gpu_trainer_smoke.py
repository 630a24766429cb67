"""GPU smoke run of the recipe loop: GRPO with a KL loss on a random ~1B Llama (bf16, sdpa,
native engine), `ref.offload` false then true, 3 steps each; prints a table of step time,
peak GPU memory, the reference's resident bytes after the run and the KL metric per step.

    python3 tools/gpu_trainer_smoke.py      # needs CUDA; writes under /tmp/mrl_smoke
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path("/tmp/mrl_smoke")
WORDS = "what is one two three four five plus ? give the number answer 0 1 2 3 4 5 6 7 8 9".split()
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048)


def assets() -> tuple[Path, Path]:
    from megatron_rl.data.writers import write_jsonl
    from tests.helpers import make_tiny_hf, write_word_tokenizer

    model, data = ROOT / "model", ROOT / "data"
    if not (model / "config.json").exists():
        make_tiny_hf(model, "llama", tie=True, vocab_size=len(WORDS) + 16, **LLAMA_1B)
        write_word_tokenizer(model, WORDS)
    data.mkdir(parents=True, exist_ok=True)
    qs = ["what is two plus two ?", "what is one plus three ?", "give the number four"]
    for split, n in (("train", 256), ("val", 16)):
        write_jsonl(data / f"{split}.jsonl", [{"prompt": qs[i % 3], "ground_truth": "4"} for i in range(n)])
    return model, data


def base_overrides(model: Path, data: Path, run_dir: Path) -> list[str]:
    """The smoke run's config: the ~1B policy, bf16, sdpa, native engine, 16 prompts x n=8 x 64
    tokens, 3 steps, no validation or final checkpoint."""
    return [f"model.path={model}", "model.dtype=bfloat16", "model.layer_spec=sdpa",
            f"data.train_files=[{data / 'train.jsonl'}]", f"data.val_files=[{data / 'val.jsonl'}]",
            "data.train_batch_size=16", "data.max_prompt_length=16", "rollout.n=8", "rollout.max_new_tokens=64",
            "actor.micro_batch_size=16", "reward.num_workers=0", f"logging.run_dir={run_dir}",
            "logging.sinks=[jsonl]", "trainer.total_steps=3", "trainer.val_before_train=false",
            "trainer.final_validation=false", "trainer.save_final=false", "trainer.resume=none"]


def fit(overrides: list[str]):
    """Build the GRPO recipe from `overrides`, train, close its logger and reward pool."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.main import build_trainer

    tr = build_trainer(load_experiment_config(None, overrides))
    try:
        tr.fit()
    finally:
        tr.logger.close()
        tr.rewards.close()
    return tr


def run(model: Path, data: Path, offload: bool) -> dict:
    run_dir = ROOT / f"run_offload{int(offload)}"
    torch.cuda.reset_peak_memory_stats()
    tr = fit(base_overrides(model, data, run_dir) + ["algos.use_kl_loss=true", f"ref.offload={str(offload).lower()}",
                                                    "reward.name=gsm8k"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ref_bytes = sum(p.untyped_storage().nbytes() for c in tr.reference.chunks for p in c.parameters()
                    if p.is_cuda)
    out = {"offload": offload, "steps": [r.get("timing/step") for r in rows],
           "kl": [r.get("actor/kl_loss") for r in rows], "ref_logprob_s": [r.get("timing/ref_logprob") for r in rows],
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "ref_gpu_bytes_after": ref_bytes,
           "plan_ref_placement": tr.plan.role("reference").placement}
    del tr
    torch.cuda.empty_cache()
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    model, data = assets()
    res = [run(model, data, False), run(model, data, True)]
    print("| ref.offload | plan placement | step s (1..3) | ref log-prob s | KL loss per step | peak GiB | "
          "reference GPU bytes after |")
    print("|---|---|---|---|---|---:|---:|")
    for r in res:
        f = lambda xs: ", ".join(f"{x:.3g}" if x is not None else "-" for x in xs)
        print(f"| {r['offload']} | {r['plan_ref_placement']} | {f(r['steps'])} | {f(r['ref_logprob_s'])} | "
              f"{f(r['kl'])} | {r['peak_gib']:.2f} | {r['ref_gpu_bytes_after']} |")
    ok = res[1]["ref_gpu_bytes_after"] == 0 and res[0]["ref_gpu_bytes_after"] > 0
    print("reference released between uses:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
