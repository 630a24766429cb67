#!/usr/bin/env python
"""vLLM 0.26 rollouts on image prompts through the real Trainer (issue #25), one GPU.

GRPO on the synthetic image task (tools/make_image_qa_data.py), `rollout.engine=vllm`
colocated, `rollout.vllm.enforce_eager=true`, `rollout.engine_logprobs=always` with
`actor.recompute_old_logprob=always` (the run plan's rule: the metric needs the engine's
log-probs AND a separate old-log-prob pass, plan/passes.py), so `rollout/logprob_diff` is
logged. Runs, each in its own subprocess with a timeout (a failure prints its traceback,
the rest still run):

  tiny_frozen   the tiny Qwen2.5-VL (tests/models/vl_fixtures.py shapes, task tokenizer:
                tools/make_tiny_vl_run.py), model.freeze_vision=true (tower left out of the sync)
  tiny_tower    the same, model.freeze_vision=false (the sync covers visual.*)
  tiny_native   the same as tiny_frozen on rollout.engine=native (the logprob_diff reference)
  big_tower     a random Qwen2.5-VL-3B-shaped model (hidden 2048, 36 layers, tower depth 32,
                hidden 1280; bf16), freeze_vision=false, 112x112 images (16 image tokens)

After training each vLLM run also re-checks the prompt expansion directly: one batch of
prompts through `attach_images` and `llm.generate`, vLLM's `prompt_token_ids` compared with
the dataset's row by row (the engine raises on a mismatch during training as well).
Prints one markdown table after every run (so a killed stage still leaves the rows done) and
writes $OUT/vllm_vl.md and $OUT/vllm_vl.json.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=/tmp/vsite:$PYTHONPATH python3 tools/gpu_vllm_vl.py
    python tools/gpu_vllm_vl.py --dry-run     # CPU: assets, configs and plans of every run, the native row for real
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ("tiny_frozen", "tiny_tower", "tiny_native", "big_tower")
TIMEOUTS = {"tiny_frozen": 150, "tiny_tower": 150, "tiny_native": 90, "big_tower": 300}
MIN_S = {"tiny": 40, "big": 120}             # a run is skipped when less of the budget is left
BIG_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6)
BIG_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
BIG_VOCAB, BIG_IMAGE = 151936, 112          # 112 px = 8x8 patches of 14 = 16 image tokens after the 2x2 merger
METRICS = ("timing/rollout", "timing/weight_sync", "weight_sync/bytes", "weight_sync/seconds", "weight_sync/gbps",
           "weight_sync/tensors", "rollout/logprob_diff", "rollout/logprob_diff_max", "reward/mean", "timing/step")


# --- assets (written once under --root) -----------------------------------------------------
def tiny_assets(root: Path) -> tuple[Path, Path]:
    """The tiny Qwen2.5-VL with the task's word tokenizer and its 32x32-image data."""
    model, data = root / "tiny-qwen2_5-vl", root / "data_tiny"
    if not (model / "model.safetensors").exists():
        from tools.make_tiny_vl_run import main as make_tiny

        make_tiny(["--model-dir", str(model), "--data-dir", str(data), "--n-train", "128"])
        save_full_processor(model, patch=4, min_pixels=8 * 8, max_pixels=64 * 64)
    return model, data


def big_assets(root: Path) -> tuple[Path, Path]:
    """A random Qwen2.5-VL-3B-shaped checkpoint (bf16, built on the GPU when there is one),
    the task tokenizer, a patch-14 processor and 112x112-image data."""
    import torch
    import transformers

    from tools.make_image_qa_data import main as make_data
    from tools.make_tiny_vl_run import prompt_words, write_tokenizer

    model, data = root / "qwen2_5-vl-3b-random", root / "data_big"
    if (model / "model.safetensors.index.json").exists() or (model / "model.safetensors").exists():
        return model, data
    make_data(["--out", str(data), "--n-train", "128", "--n-val", "16", "--size", str(BIG_IMAGE)])
    model.mkdir(parents=True, exist_ok=True)
    tok, _ = write_tokenizer(model, prompt_words(data))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>")}
    text = dict(BIG_TEXT, vocab_size=BIG_VOCAB, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=None, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                    "rope_theta": 1000000.0})
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(BIG_VISION), tie_word_embeddings=True,
                                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                        vision_start_token_id=ids["<|vision_start|>"],
                                        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            hf = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    hf.save_pretrained(model, safe_serialization=True)
    del hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    save_full_processor(model, patch=14, min_pixels=56 * 56, max_pixels=BIG_IMAGE * BIG_IMAGE * 4)
    return model, data


def save_full_processor(model: Path, patch: int, min_pixels: int, max_pixels: int) -> str:
    """Write what vLLM's `Qwen2_5_VLProcessor.from_pretrained(model, use_fast=True)` reads:
    preprocessor_config.json (patch size = the tower's), the tokenizer, the chat template and,
    where torchvision is importable (the GPU machine), processor_config.json plus a video
    processor config with the same patch sizes (vLLM builds the whole processor; video is
    disabled by limit_mm_per_prompt). Returns what was written."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels,
                                  max_pixels=max_pixels)
    ip.save_pretrained(model)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    try:
        import torchvision  # noqa: F401
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        vp = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
        proc = transformers.Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                                chat_template=tok.chat_template)
        proc.save_pretrained(model)
        return "full processor (image + video + tokenizer + chat template)"
    except Exception as e:                   # no torchvision (CPU): image processor + tokenizer only
        return f"image processor + tokenizer only ({type(e).__name__}: {e})"


def check_processor(model: Path) -> str:
    """What vLLM does first: build the HF processor (fast image processor) and run it on one image."""
    import transformers
    from PIL import Image

    proc = transformers.Qwen2_5_VLProcessor.from_pretrained(str(model), use_fast=True)
    side = 32 if "tiny" in model.name else BIG_IMAGE
    out = proc(text=[proc.image_token], images=[Image.new("RGB", (side, side), "red")], return_tensors="pt")
    return (f"{type(proc.image_processor).__name__}: grid {out['image_grid_thw'].tolist()}, "
            f"{int((out['input_ids'] == proc.image_token_id).sum())} pads")


# --- the runs ---------------------------------------------------------------------------------
def overrides(name: str, root: Path, cuda: bool, steps: int) -> list[str]:
    big = name.startswith("big")
    model, data = (root / "qwen2_5-vl-3b-random", root / "data_big") if big else (root / "tiny-qwen2_5-vl",
                                                                                  root / "data_tiny")
    o = [f"model.path={model}", f"data.train_files=[{data / 'train.jsonl'}]", f"data.val_files=[{data / 'val.jsonl'}]",
         f"model.freeze_vision={'false' if name.endswith('tower') else 'true'}",
         "rollout.engine=" + ("native" if name.endswith("native") else "vllm"), "rollout.vllm.enforce_eager=true",
         "rollout.engine_logprobs=always", "actor.recompute_old_logprob=always", "token_weights.source=none",
         "data.train_batch_size=8", "rollout.n=4", "rollout.max_new_tokens=16", "actor.micro_batch_size=16",
         "rollout.gpu_memory_utilization=0.3", f"trainer.total_steps={steps}", "trainer.val_before_train=false",
         "trainer.val_every=0", "trainer.final_validation=false", "trainer.save_final=false", "trainer.save_every=0",
         "trainer.resume=none", f"logging.run_dir={root / ('run_' + name)}", "logging.sinks=[jsonl]"]
    o += (["model.dtype=bfloat16", "model.layer_spec=sdpa"] if cuda else ["model.dtype=float32", "model.layer_spec=local"])
    if big:   # 16 image tokens + ~20 text words; pixel bounds that keep 112x112 at its size
        o += ["data.max_prompt_length=64", f"data.image.max_pixels={BIG_IMAGE * BIG_IMAGE}",
              f"data.image.min_pixels={56 * 56}", "actor.micro_batch_size=8",
              # ~50 GB of fp32 optimizer state + master weights: moving it to pinned host memory each step
              # costs more than this run has; training state (~60 GB) + vLLM (0.3 x 141 GB) fit an H200
              "actor.offload_during_rollout=none"]
    else:     # the tiny config has max_position_embeddings 256: vLLM refuses a longer max_model_len
        o += ["rollout.vllm.max_model_len=256"]
    return o


def load_cfg(name: str, root: Path, cuda: bool, steps: int):
    from megatron_rl.config import load_experiment_config

    return load_experiment_config(str(ROOT / "configs/grpo_vl_vgr_cpu.yaml"), overrides(name, root, cuda, steps))


def plan_checks(cfg) -> dict:
    """The plan must ask the engine for log-probs and keep the old-log-prob pass (else no metric)."""
    from megatron_rl.plan.run_plan import resolve_plan

    plan = resolve_plan(cfg, world_size=1, device="cuda")
    if not (plan.rollout.engine_logprobs and plan.old_logprob.separate_pass):
        raise RuntimeError(f"rollout/logprob_diff would not be logged: engine_logprobs={plan.rollout.engine_logprobs} "
                           f"({plan.rollout.engine_logprobs_reason}), old log-probs {plan.old_logprob.source}")
    return {"plan_engine_logprobs": plan.rollout.engine_logprobs_reason, "plan_old_logprob": plan.old_logprob.source}


def expansion_probe(tr) -> str:
    """One batch of training prompts straight through vLLM: its expanded prompt ids vs ours."""
    import vllm

    from megatron_rl.rollout.vllm_convert import prompt_token_lists
    from megatron_rl.rollout.vllm_multimodal import attach_images

    eng = tr.engine
    prompts = tr.data.next_batch()
    ours = prompt_token_lists(prompts)
    requests = [{"prompt_token_ids": p} for p in ours]
    rows = attach_images(prompts, requests, eng._image_pad_id)
    eng.wake()
    outs = eng.llm.generate(requests, [vllm.SamplingParams(max_tokens=1, detokenize=False)] * len(requests),
                            use_tqdm=False)
    if eng.colocate and eng.cfg.sleep_level:
        eng.sleep()
    same = sum(list(outs[i].prompt_token_ids) == ours[i] for i in rows)
    lens = sorted({len(ours[i]) for i in rows})
    return f"{same}/{len(rows)} rows equal (prompt lengths {lens})"


def child(name: str, root: Path, steps: int, out: Path) -> int:
    """One run in this process; writes `out` (JSON) whatever happens."""
    import torch

    res: dict = {"run": name, "ok": False}
    t0 = time.time()
    try:
        cuda = torch.cuda.is_available()
        if name.startswith("big"):     # written here (on the GPU), not in the parent, which stays off CUDA
            model, _ = big_assets(root)
            res["assets_s"] = time.time() - t0
            try:
                res["processor"] = check_processor(model)
            except Exception as e:      # vLLM will say more; the run still goes
                res["processor"] = f"FAILED {type(e).__name__}: {e}"
            print(f"{name}: assets {res['assets_s']:.0f} s, processor {res['processor']}", flush=True)
        cfg = load_cfg(name, root, cuda, steps)
        res.update(plan_checks(cfg))
        from megatron_rl.trainer.main import build_trainer

        tr = build_trainer(cfg)
        res["build_s"] = time.time() - t0 - res.get("assets_s", 0.0)
        try:
            tr.fit()
        finally:
            tr.logger.close()
            tr.rewards.close()
        res["fit_s"] = time.time() - t0 - res["build_s"] - res.get("assets_s", 0.0)
        if cfg.rollout.engine == "vllm":
            res["expanded_match"] = "engine check passed every step; probe " + expansion_probe(tr)
        else:
            res["expanded_match"] = "n/a (native engine)"
        res["steps"] = read_metrics(Path(cfg.logging.run_dir) / "metrics.jsonl")
        res["ok"] = True
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        if "vLLM expanded prompt" in str(e):
            res["expanded_match"] = "NO: " + str(e)[:300]
        traceback.print_exc()
    res["wall_s"] = time.time() - t0
    out.write_text(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


def read_metrics(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [{k: r[k] for k in ("step",) + METRICS if k in r} for r in rows if "step" in r]


# --- the table ----------------------------------------------------------------------------------
def _series(steps: list[dict], key: str, fmt: str = "{:.3g}") -> str:
    vals = [s[key] for s in steps if key in s]
    return ", ".join(fmt.format(v) for v in vals) if vals else "-"


def table(results: list[dict]) -> str:
    head = ("| run | ok | rollout s (per step) | weight sync s | sync GB | sync GB/s | logprob_diff mean | "
            "logprob_diff max | reward/mean | vLLM expanded prompts = ours | build s (incl. vLLM start) | wall s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        st = r.get("steps", [])
        gb = _series(st, "weight_sync/bytes", "{:.4g}") if st else "-"
        if gb != "-":
            gb = ", ".join(f"{float(x) / 1e9:.3f}" for x in gb.split(", "))
        ok = "yes" if r.get("ok") else f"NO: {r.get('error', '?')[:160]}"
        lines.append(f"| {r['run']} | {ok} | {_series(st, 'timing/rollout')} | {_series(st, 'timing/weight_sync')} | "
                     f"{gb} | {_series(st, 'weight_sync/gbps')} | {_series(st, 'rollout/logprob_diff')} | "
                     f"{_series(st, 'rollout/logprob_diff_max')} | {_series(st, 'reward/mean')} | "
                     f"{r.get('expanded_match', '-')} | {r.get('build_s', 0):.0f} | {r.get('wall_s', 0):.0f} |")
    return "\n".join(lines)


def report(results: list[dict], notes: list[str]) -> None:
    text = table(results) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print("\n" + text + "\n", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vllm_vl.md").write_text(text + "\n")
        Path(os.environ["OUT"], "vllm_vl.json").write_text(json.dumps(results, indent=1))


def run_child(name: str, root: Path, steps: int, timeout: int) -> dict:
    out = root / f"result_{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--root", str(root), "--steps", str(steps)]
    print(f"== {name}: {' '.join(cmd)} (timeout {timeout} s)", flush=True)
    t = time.time()
    try:
        rc = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if out.exists():
        return json.loads(out.read_text())
    return {"run": name, "ok": False, "error": f"child exited {rc} without a result", "wall_s": time.time() - t}


def dry_run(root: Path, runs: list[str]) -> int:
    """CPU: assets, every run's config + plan + vLLM engine kwargs; the native run for real (1 step)."""
    from megatron_rl.rollout.vllm_multimodal import vision_skip_prefixes, vl_engine_kwargs

    notes = []
    tiny, _ = tiny_assets(root)
    notes.append(f"tiny processor files: {sorted(p.name for p in tiny.iterdir() if p.suffix in ('.json', '.jinja'))}")
    results = []
    for name in runs:
        if name.startswith("big"):   # the 3B checkpoint is GPU-sized: check its config only
            cfg = load_cfg(name, root, cuda=True, steps=1)
            notes.append(f"{name}: config ok ({cfg.model.path}, not built on CPU)")
            continue
        cfg = load_cfg(name, root, cuda=False, steps=1)
        p = plan_checks(cfg)
        kw = vl_engine_kwargs(cfg, cfg.model.tokenizer_path or cfg.model.path)
        notes.append(f"{name}: plan {p}; vLLM kwargs {kw}; sync skips {vision_skip_prefixes(cfg)}")
        if name.endswith("native"):
            results.append(run_child(name, root, 1, 300))
    report(results, notes)
    return 0 if all(r.get("ok") for r in results) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=os.environ.get("VLLMVL_RUNS", ",".join(RUNS)))
    ap.add_argument("--root", default="/tmp/mrl_vllm_vl")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--child", default="")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("VLLMVL_BUDGET_S", 290)),
                    help="wall-clock budget of all runs; a run that cannot get its minimum is skipped")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # callables through apply_model (as gpu_vllm.py)
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"--runs: unknown {bad}; choose from {RUNS}")
    if args.child:
        return child(args.child, root, args.steps, root / f"result_{args.child}.json")
    if args.dry_run:
        return dry_run(root, runs)
    notes, results = [], []
    t_start = time.time()
    if any(r.startswith("tiny") for r in runs):
        try:   # CPU only; the 3B checkpoint is written by its own child (GPU), not here
            model, _ = tiny_assets(root)
            notes.append(f"tiny assets {model} ({time.time() - t_start:.0f} s)")
            notes.append(f"tiny HF processor (use_fast=True): {check_processor(model)}")
        except Exception as e:
            traceback.print_exc()
            notes.append(f"tiny assets / processor FAILED: {type(e).__name__}: {e}")
        print(notes, flush=True)
    for name in runs:
        left = args.budget_s - (time.time() - t_start)
        if left < MIN_S[name.split("_")[0]]:
            results.append({"run": name, "ok": False, "error": f"skipped: {left:.0f} s left of --budget-s "
                                                                f"{args.budget_s:.0f} (VLLMVL_RUNS={name} runs it alone)"})
            continue
        steps = 2 if name.startswith("big") else args.steps
        results.append(run_child(name, root, steps, int(min(TIMEOUTS[name], left))))
        report(results, notes)
    report(results, notes)
    return 0 if results and all(r.get("ok") for r in results) else 1

if __name__ == "__main__":
    raise SystemExit(main())
