"""Check the Triton log-prob/entropy kernels against the torch reference on a GPU.

Fresh random inputs each run (bf16 / fp16 / fp32; odd vocab sizes; labels on
"another rank"; temperature; strided rows; in-place backward). Prints one line
per case and exits 1 if any relative error exceeds its tolerance.

    PYTHONPATH=. python tools/gpu_kernels_check.py
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron_rl.kernels import linear_token_logprob, token_logprob_entropy, token_weighted_ppo_loss

DEVICE = "cuda"
TOL = {"logprob": 1e-4, "entropy": 1e-4, "grad": 2e-2}  # grad: bf16 output rounding dominates


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + |b|), elementwise, for values; norm-relative for gradients."""
    return ((a.double() - b.double()).abs() / (1 + b.double().abs())).max().item()


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_case(name, rows, vocab, dtype, temperature=1.0, label_range=None, row_pad=0, inplace=False, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    wide = torch.randn(rows, vocab + row_pad, device=DEVICE, generator=gen, dtype=torch.float32) * 4
    logits = wide.to(dtype)[:, :vocab]  # row stride > vocab when row_pad > 0
    lo, hi = label_range or (0, vocab)
    labels = torch.randint(lo, hi, (rows,), device=DEVICE, generator=gen)
    g_lp = torch.randn(rows, device=DEVICE, generator=gen)
    g_h = torch.randn(rows, device=DEVICE, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        leaf = logits.detach().clone().requires_grad_()
        x = leaf * 1 if (inplace and backend == "triton") else leaf
        lp, h = token_logprob_entropy(x, labels, temperature=temperature, backend=backend,
                                      inplace_backward=inplace and backend == "triton")
        (grad,) = torch.autograd.grad((lp * g_lp + h * g_h).sum(), x)
        results[backend] = (lp.detach(), h.detach(), grad)
    (lp0, h0, g0), (lp1, h1, g1) = results["torch"], results["triton"]
    errs = {"logprob": rel_err(lp1, lp0), "entropy": rel_err(h1, h0), "grad": norm_rel_err(g1, g0)}
    ok = all(errs[k] <= TOL[k] for k in errs) and all(torch.isfinite(t).all() for t in (lp1, h1, g1))
    print(f"{'ok  ' if ok else 'FAIL'} {name:<34} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
    return ok


def run_loss_case(seed=0):
    """The full loss on bf16 logits: Triton path vs torch path, value and gradient."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    b, t, v = 4, 64, 5000
    logits = torch.randn(b, t, v, device=DEVICE, generator=g).bfloat16()
    labels = torch.randint(0, v, (b, t), device=DEVICE, generator=g)
    old = -torch.rand(b, t, device=DEVICE, generator=g) * 8
    adv = torch.randn(b, t, device=DEVICE, generator=g)
    mask = (torch.rand(b, t, device=DEVICE, generator=g) > 0.1).float()
    weights = torch.rand(b, t, device=DEVICE, generator=g)
    out = {}
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        loss, _ = token_weighted_ppo_loss(x, labels, old, adv, mask, token_weights=weights, ref_logprob=old,
                                          kl_coef=0.05, entropy_coef=0.01, backend=backend)
        (grad,) = torch.autograd.grad(loss, x)
        out[backend] = (loss.detach(), grad)
    errs = {"loss": rel_err(out["triton"][0], out["torch"][0]), "grad": norm_rel_err(out["triton"][1], out["torch"][1])}
    ok = errs["loss"] <= 1e-4 and errs["grad"] <= TOL["grad"]
    print(f"{'ok  ' if ok else 'FAIL'} {'ppo loss bf16 [4,64,5000]':<34} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    return ok


def run_linear_case(seed=0, tokens=600, hidden_size=512, vocab=32000):
    """linear_token_logprob on bf16: Triton path vs torch path (values, d hidden, d weight)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, device=DEVICE, generator=g).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device=DEVICE, generator=g) * 0.05).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=g)
    g_lp, g_h = torch.randn(tokens, device=DEVICE, generator=g), torch.randn(tokens, device=DEVICE, generator=g)
    out = {}
    for backend in ("torch", "triton"):
        h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = linear_token_logprob(h_in, w_in, labels, chunk_tokens=128, backend=backend)
        out[backend] = (lp.detach(), ent.detach(), *torch.autograd.grad((lp * g_lp + ent * g_h).sum(), (h_in, w_in)))
    (lp0, e0, gh0, gw0), (lp1, e1, gh1, gw1) = out["torch"], out["triton"]
    errs = {"logprob": rel_err(lp1, lp0), "entropy": rel_err(e1, e0), "grad": max(norm_rel_err(gh1, gh0),
                                                                                  norm_rel_err(gw1, gw0))}
    ok = all(errs[k] <= TOL[k] for k in errs)
    print(f"{'ok  ' if ok else 'FAIL'} {f'linear bf16 {tokens}x{hidden_size}x{vocab}':<34} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    return ok


def main() -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=time.time_ns() % 2**31)
    ap.add_argument("--cpu", action="store_true", help="smoke-test this script on CPU (needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_kernels_check: no CUDA device", file=sys.stderr)
        return 2
    name = "cpu (Triton interpreter)" if args.cpu else torch.cuda.get_device_name()
    print(f"device: {name}  torch {torch.__version__}  seed {args.seed}")
    cases = [
        ("bf16 128x49152", 128, 49152, torch.bfloat16),
        ("bf16 257x50257 (odd sizes)", 257, 50257, torch.bfloat16),
        ("bf16 64x152064 T=0.7", 64, 152064, torch.bfloat16, 0.7),
        ("bf16 100x32000 labels half elsewhere", 100, 32000, torch.bfloat16, 1.0, (-32000, 32000)),
        ("bf16 96x4099 strided rows", 96, 4099, torch.bfloat16, 1.0, None, 61),
        ("bf16 128x49152 inplace bwd", 128, 49152, torch.bfloat16, 1.0, None, 0, True),
        ("fp16 77x32768", 77, 32768, torch.float16),
        ("fp32 33x100000", 33, 100000, torch.float32),
        ("bf16 3x7 tiny", 3, 7, torch.bfloat16),
    ]
    if args.cpu:
        cases = [("bf16 5x300", 5, 300, torch.bfloat16), ("bf16 6x70 strided inplace", 6, 70, torch.bfloat16,
                                                          0.7, (-70, 70), 3, True)]
    ok = all([run_case(*c, seed=args.seed + i) for i, c in enumerate(cases)])
    ok = (args.cpu or run_loss_case(args.seed)) and ok
    ok = (args.cpu or run_linear_case(args.seed)) and ok
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
