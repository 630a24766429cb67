"""Two-GPU (NCCL) correctness: one PPO training step at TP=2 and at PP=2 equals TP=1, and
the fused vocab-parallel loss at TP=2 equals the unsplit loss.

Run under torchrun with 2 processes (on CPU with gloo for a smoke test: `--tiny`):

    torchrun --standalone --nproc-per-node 2 tools/gpu_multi_check.py [--json OUT.json]

The TP=1 reference runs in the same launch as DP=2 on an identical batch, so its
gradient equals the single-GPU one. Layouts are compared on (a) log-probs before the
step, (b) pg_loss and grad norm of the step, (c) the step's gradient
(DDP main_grad, gathered into HF layout): relative L2 error, (d) the Adam update
`w_after - w_before` (Adam's first step is ~lr*sign(g), so elements with ~0 gradient
may flip between layouts: the relative error of the update overstates the difference).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_random_llama(out: Path, *, tiny: bool) -> Path:
    import transformers

    if (out / "config.json").exists():
        return out
    if tiny:
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    else:
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                       num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                                       max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


def synthetic_batch(vocab: int, b: int, p: int, r: int, seed: int = 0):
    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, : p // 3] = 0
    resp_mask = torch.ones(b, r)
    resp_mask[2, r // 2:] = 0
    return Batch({"prompt_ids": torch.randint(0, vocab, (b, p), generator=g), "prompt_mask": prompt_mask,
                  "response_ids": torch.randint(0, vocab, (b, r), generator=g), "response_mask": resp_mask,
                  "advantages": torch.randn(b, r, generator=g) * resp_mask},
                 [{"uid": str(i), "group": i // 2} for i in range(b)])


def progress(msg: str) -> None:
    print(f"[rank {dist.get_rank()} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one_step(hf: Path, tp: int, pp: int, dtype: str, batch, lr: float) -> dict:
    from megatron.core import parallel_state as mpu

    from megatron_rl.algos.config import AlgosConfig
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    init_distributed(tp=tp, pp=pp)
    progress(f"tp={tp} pp={pp}: building")
    tdtype = getattr(torch, dtype)
    model = load_checkpoint(str(hf), layer_spec="local", dtype=tdtype)
    before = {k: v.float().cpu() for k, v in iter_hf_weights(model)}
    ddp = wrap_ddp(model, False)   # all-reduced (not reduce-scattered) grads: every rank holds the full gradient
    opt, sched = build_optimizer(ddp, OptimConfig(lr=lr, clip_grad=1.0, distributed_optimizer=False), dtype, 10)
    policy = Policy(model, micro_batch_size=2, optimizer=opt, scheduler=sched, ddp_model=ddp)
    progress(f"tp={tp} pp={pp}: log-probs + update")
    t0 = time.time()
    lp, _ = policy.compute_logprobs(batch)
    if "old_logprob" not in batch:   # the TP=1 run sets it; the others reuse it (ratios near 1, few clipped)
        g = torch.Generator().manual_seed(1)
        batch["old_logprob"] = (lp.float().cpu() + 0.05 * torch.randn(lp.shape, generator=g)) * batch["response_mask"]
    metrics = policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    delta = {k: v.float().cpu() - before[k] for k, v in iter_hf_weights(model)}
    with torch.no_grad():   # the step's gradient, in HF layout: put main_grad where the weights were
        for p in model.parameters():
            p.copy_(p.main_grad)
    grad = {k: v.float().cpu() for k, v in iter_hf_weights(model)}
    out = {"logprob": lp.float().cpu(), "metrics": metrics[0], "delta": delta, "grad": grad, "time_s": elapsed}
    del policy, opt, ddp, model
    mpu.destroy_model_parallel()
    return out


def _rel_l2(a: dict, b: dict) -> float:
    num = sum(float((b[k] - v).pow(2).sum()) for k, v in a.items())
    return (num / max(sum(float(v.pow(2).sum()) for v in a.values()), 1e-30)) ** 0.5


def compare_steps(ref: dict, par: dict) -> dict:
    return {"logprob_max_diff": float((ref["logprob"] - par["logprob"]).abs().max()),
            "pg_loss_ref": ref["metrics"]["pg_loss"], "pg_loss": par["metrics"]["pg_loss"],
            "grad_norm_ref": ref["metrics"]["grad_norm"], "grad_norm": par["metrics"]["grad_norm"],
            "grad_rel_l2": _rel_l2(ref["grad"], par["grad"]),
            "delta_rel_l2": _rel_l2(ref["delta"], par["delta"]),
            "delta_max_diff": max(float((par["delta"][k] - d).abs().max()) for k, d in ref["delta"].items()),
            "time_s": par["time_s"]}


def fused_loss_tp2(tiny: bool) -> dict:
    """Fused vocab-parallel log-prob + PPO loss at TP=2 vs the unsplit fused call on each rank."""
    from megatron_rl.kernels import token_logprob_entropy, token_weighted_ppo_loss

    rank = dist.get_rank()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, t, v = (2, 8, 96) if tiny else (4, 2048, 49152)
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    labels = torch.randint(0, v, (b, t), generator=g).to(dev)
    old = (-torch.rand(b, t, generator=g) * 4).to(dev)
    adv = torch.randn(b, t, generator=g).to(dev)
    weights = torch.rand(b, t, generator=g).to(dev)
    mask = torch.ones(b, t, device=dev)

    def run(lg, group):
        lg = lg.clone().requires_grad_()
        loss, _ = token_weighted_ppo_loss(lg, labels, old, adv, mask, token_weights=weights, tp_group=group,
                                          entropy_coef=0.01)
        lp, _ = token_logprob_entropy(lg.detach(), labels, tp_group=group)
        loss.backward()
        return loss.detach().float(), lp.float(), lg.grad.float()

    loss1, lp1, grad1 = run(logits, None)
    half = v // 2
    group = dist.new_group([0, 1])
    loss2, lp2, grad2 = run(logits[..., rank * half:(rank + 1) * half].contiguous(), group)
    return {"shape": f"{b}x{t}x{v}", "loss_diff": float((loss1 - loss2).abs()),
            "logprob_max_diff": float((lp1 - lp2).abs().max()),
            "grad_max_diff": float((grad1[..., rank * half:(rank + 1) * half] - grad2).abs().max()),
            "grad_max": float(grad1.abs().max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small model (CPU/gloo smoke run)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--hang-timeout", type=float, default=240,
                    help="dump every thread's stack and exit after this many seconds")
    args = ap.parse_args()
    import faulthandler
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    from megatron_rl.parallel import init_distributed

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() and not args.tiny else "float32")
    init_distributed(tp=1, pp=1, timeout_s=int(args.hang_timeout))
    progress("process group up")
    if dist.get_world_size() != 2:
        raise SystemExit("run with exactly 2 processes (torchrun --nproc-per-node 2)")
    from megatron.core import parallel_state as mpu
    mpu.destroy_model_parallel()
    root = Path(os.environ.get("GPU_CHECK_DIR", tempfile.gettempdir())) / ("mrl_tiny" if args.tiny else "mrl_llama")
    if dist.get_rank() == 0:
        make_random_llama(root, tiny=args.tiny)
    dist.barrier()
    progress("model written")
    vocab = 96 if args.tiny else 32000
    batch = synthetic_batch(vocab, 8, 16 if args.tiny else 128, 12 if args.tiny else 384)
    ref = one_step(root, 1, 1, dtype, batch, args.lr)
    rows = {}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        rows[name] = compare_steps(ref, one_step(root, tp, pp, dtype, batch, args.lr))
    progress("fused loss TP=2")
    rows["fused_loss_tp2"] = fused_loss_tp2(args.tiny)
    if dist.get_rank() == 0:
        print(f"\n| layout | logprob max diff | pg_loss (TP=1 / layout) | grad norm (TP=1 / layout) "
              f"| grad rel. L2 err | Adam update rel. L2 err | update max diff | step s |  dtype={dtype}")
        print("|---|---|---|---|---|---|---|---|")
        for name in ("tp2", "pp2"):
            r = rows[name]
            print(f"| {name} | {r['logprob_max_diff']:.2e} | {r['pg_loss_ref']:.5f} / {r['pg_loss']:.5f} | "
                  f"{r['grad_norm_ref']:.4f} / {r['grad_norm']:.4f} | {r['grad_rel_l2']:.2e} | {r['delta_rel_l2']:.2e} | "
                  f"{r['delta_max_diff']:.2e} | {r['time_s']:.2f} |")
        f = rows["fused_loss_tp2"]
        print(f"\nfused loss TP=2 ({f['shape']}): loss diff {f['loss_diff']:.2e}, log-prob max diff "
              f"{f['logprob_max_diff']:.2e}, grad max diff {f['grad_max_diff']:.2e} (grad max {f['grad_max']:.2e})")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    from megatron_rl.parallel import destroy_distributed
    destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
