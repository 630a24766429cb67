"""GPU check of grouped-GEMM MoE on the Transformer Engine spec (issue 19), one GPU, < 3 minutes.

(a) A tiny random Qwen3-MoE saved by transformers (tests/helpers.py `make_tiny_hf`), loaded
    with `layer_spec te` (`model.moe.grouped_gemm` auto: TEGroupedMLP experts): logits vs
    transformers in float32 and bfloat16 (sdpa/SequentialMLP and te/SequentialMLP rows for
    comparison), the HF export stream bit-exact against the checkpoint, and a Megatron
    dist-checkpoint saved from grouped experts loaded into SequentialMLP experts.
(b) The Qwen3-30B-A3B-shaped 4-layer slice (tools/bench_moe_slice.py, one subprocess per
    spec): te + grouped GEMM vs sdpa (SequentialMLP): log-prob pass and PPO update time,
    TFLOP/s on active parameters, measured update peak vs the planner's.

Every check is guarded: a failure prints its traceback and the rest still runs.

    python3 tools/gpu_moe_te_check.py [--json OUT] [--skip-slice] [--iters 3]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOL = {"float32": 1e-3, "bfloat16": 5e-2}
DEVICE = "cuda"
SPEC = {"te": "te", "sdpa": "sdpa"}      # --cpu-smoke maps both to "local" (code paths only, no TE)


def _ids(device):
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :5] = 0                                   # left padding
    return ids.to(device), am.to(device)


def _experts_kind(model) -> str:
    return next((type(layer.mlp.experts).__name__ for layer in model.decoder.layers if hasattr(layer.mlp, "experts")),
                "none")


def logits_row(hf_dir: str, dtype: str, layer_spec: str, grouped_gemm) -> dict:
    import transformers

    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward, position_ids_from_mask
    from megatron_rl.models.moe_config import MoEConfig

    tdt = getattr(torch, dtype)
    model = load_checkpoint(hf_dir, dtype=dtype, layer_spec=SPEC[layer_spec],
                            moe=MoEConfig(grouped_gemm=grouped_gemm)).eval()
    ids, am = _ids(DEVICE)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=tdt).to(DEVICE).eval()
    with torch.no_grad():
        got = gpt_forward(model, ids, am).float()[..., :96]
        ref = hf(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits.float()
    keep = am.bool()
    diff = (got[keep] - ref[keep]).abs()
    names = [n for n, _ in model.named_parameters()]
    experts = _experts_kind(model)
    expect = "TEGroupedMLP" if SPEC[layer_spec] == "te" and grouped_gemm in ("auto", True) else "SequentialMLP"
    return dict(dtype=dtype, layer_spec=layer_spec, grouped_gemm=str(grouped_gemm), experts=experts,
                grouped_names=any(re.search(r"\.mlp\.experts\.linear_fc1\.weight0$", n) for n in names),
                max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(),
                logit_scale=ref[keep].abs().max().item(), ok=diff.max().item() < TOL[dtype] and experts == expect,
                model=model)


def export_round_trip(model, hf_dir: str) -> dict:
    from safetensors.torch import load_file

    from megatron_rl.models import iter_hf_weights

    ref = load_file(str(Path(hf_dir) / "model.safetensors"))
    got = {k: v.detach().cpu() for k, v in iter_hf_weights(model)}
    bad = [k for k in ref if k not in got or not torch.equal(got[k], ref[k])]
    return dict(tensors=len(ref), exported=len(got), mismatched=len(bad), first_bad=bad[:3],
                ok=not bad and sorted(got) == sorted(ref))


def dist_ckpt_to_sequential(model, hf_dir: str, tmp: Path) -> dict:
    """Grouped experts -> Megatron dist-checkpoint -> SequentialMLP experts (sdpa spec): same HF tensors."""
    from safetensors.torch import load_file

    from megatron_rl.models import iter_hf_weights, load_checkpoint, save_mcore_checkpoint

    save_mcore_checkpoint(model, tmp / "mc_grouped")
    seq = load_checkpoint(str(tmp / "mc_grouped"), dtype="float32", layer_spec=SPEC["sdpa"])
    ref = load_file(str(Path(hf_dir) / "model.safetensors"))
    got = {k: v.detach().cpu() for k, v in iter_hf_weights(seq)}
    bad = [k for k in ref if k not in got or not torch.equal(got[k], ref[k])]
    return dict(experts=_experts_kind(seq), mismatched=len(bad), first_bad=bad[:3], ok=not bad)


def section_tiny(tmp: Path, out: dict) -> None:
    from megatron_rl.parallel import init_distributed
    from tests.helpers import make_tiny_hf

    hf = make_tiny_hf(tmp / "qwen3_moe", "qwen3_moe", tie=False)
    init_distributed()
    rows, grouped_fp32 = [], None
    for dtype, spec, gg in (("float32", "te", "auto"), ("float32", "te", False), ("float32", "sdpa", "auto"),
                            ("bfloat16", "te", "auto"), ("bfloat16", "sdpa", "auto")):
        try:
            r = logits_row(hf, dtype, spec, gg)
            model = r.pop("model")
            if dtype == "float32" and spec == "te" and gg == "auto":
                grouped_fp32 = model
            rows.append(r)
        except Exception as e:
            traceback.print_exc()
            rows.append(dict(dtype=dtype, layer_spec=spec, grouped_gemm=str(gg), error=f"{type(e).__name__}: {e}"))
    out["logits"] = rows
    print("\n(a) tiny random Qwen3-MoE (4 layers, 4 experts top-2, layer 1 dense) vs transformers")
    print("| dtype | spec | grouped_gemm | experts | max abs diff | mean abs diff | logit scale | tol | ok |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['dtype']} | {r['layer_spec']} | {r['grouped_gemm']} | ERROR {r['error'][:120]} | | | | | no |")
            continue
        print(f"| {r['dtype']} | {r['layer_spec']} | {r['grouped_gemm']} | {r['experts']} | {r['max_abs_diff']:.3g} | "
              f"{r['mean_abs_diff']:.3g} | {r['logit_scale']:.3g} | {TOL[r['dtype']]:g} | {r['ok']} |")
    if grouped_fp32 is None:
        print("grouped fp32 model not built: export / checkpoint checks skipped")
        return
    for key, fn in (("export", lambda: export_round_trip(grouped_fp32, hf)),
                    ("dist_ckpt", lambda: dist_ckpt_to_sequential(grouped_fp32, hf, tmp))):
        try:
            out[key] = fn()
        except Exception as e:
            traceback.print_exc()
            out[key] = dict(ok=False, error=f"{type(e).__name__}: {e}")
    print(f"HF export from TEGroupedMLP (fp32), bit-exact vs the checkpoint: {out['export']}")
    print(f"dist-checkpoint TEGroupedMLP -> SequentialMLP (sdpa), HF tensors bit-exact: {out['dist_ckpt']}")


def section_slice(tmp: Path, out: dict, iters: int) -> None:
    rows = []
    for spec, gg in (("te", "auto"), ("sdpa", "auto")):
        js = tmp / f"slice_{spec}.json"
        cmd = [sys.executable, str(ROOT / "tools" / "bench_moe_slice.py"), "--layer-spec", spec, "--grouped-gemm", gg,
               "--iters", str(iters), "--json", str(js)]
        print("==", " ".join(cmd[1:]), flush=True)
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
            tail = [ln for ln in (p.stdout + p.stderr).splitlines() if "warn" not in ln.lower()][-12:]
            print("\n".join(tail), flush=True)
            rows.append(json.loads(js.read_text()) if js.exists() else dict(layer_spec=spec, error=f"rc {p.returncode}"))
        except Exception as e:
            traceback.print_exc()
            rows.append(dict(layer_spec=spec, error=f"{type(e).__name__}: {e}"))
    out["slice"] = rows
    print("\n(b) Qwen3-30B-A3B-shaped slice (4 layers, 128 experts top-8), 8 x 2048 tokens, bf16, 1 GPU")
    print("| spec | experts | log-probs s | log-probs TFLOP/s | update s | update TFLOP/s | measured peak GiB | "
          "planner GiB | planner error % | grad norm |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['layer_spec']} | ERROR {r['error']} | | | | | | | | |")
            continue
        err = 100 * (r["planned_gib"] - r["peak_gib"]) / r["peak_gib"]
        print(f"| {r['layer_spec']} | {r['experts']} | {r['logprob_s']:.3f} | {r['logprob_tflops']:.1f} | "
              f"{r['update_s']:.3f} | {r['update_tflops']:.1f} | {r['peak_gib']:.1f} | {r['planned_gib']:.1f} | "
              f"{err:+.1f} | {r['grad_norm']:.4g} |")
    ok = [r for r in rows if "error" not in r]
    if len(ok) == 2:
        print(f"update speed-up te/grouped over sdpa/sequential: {ok[1]['update_s'] / ok[0]['update_s']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-slice", action="store_true")
    ap.add_argument("--iters", type=int, default=3, help="slice rounds (the first is a warm-up)")
    ap.add_argument("--cpu-smoke", action="store_true", help="section (a) on CPU with the local spec (no TE)")
    args = ap.parse_args()
    global DEVICE
    if args.cpu_smoke:
        DEVICE, args.skip_slice = "cpu", True
        SPEC.update(te="local", sdpa="local")
    elif not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    try:
        import transformer_engine
        print(f"transformer_engine {getattr(transformer_engine, '__version__', '?')}, torch {torch.__version__}, "
              f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}")
    except Exception as e:
        print(f"transformer_engine not importable ({type(e).__name__}: {e}): the te rows will fail")
    out: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="moete_"))
    try:
        section_tiny(tmp, out)
    except Exception:
        traceback.print_exc()
    if not args.skip_slice:
        try:
            section_slice(tmp, out, args.iters)
        except Exception:
            traceback.print_exc()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
