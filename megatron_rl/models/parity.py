"""Megatron vs HF transformers logits on the same tokens (the foundation's acceptance check).

`megatron-rl check-logits --model DIR [--tp N]`: at TP=N the comparison runs in N gloo
processes (the Megatron logits are gathered over TP; rank 0 reports)."""
from __future__ import annotations

import os
import socket
import time

import torch


def compare_logits(hf_dir, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   dtype=torch.float32, layer_spec: str = "local") -> dict:
    """Comparison at the initialised TP layout (default: one process, TP=1); returns
    max/mean abs diff over real tokens."""
    import transformers

    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward, position_ids_from_mask
    from megatron_rl.parallel import init_distributed
    from megatron_rl.parallel.collectives import gather_vocab_parallel

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    from megatron.core import parallel_state as mpu
    if not mpu.model_parallel_is_initialized():     # else: the caller's layout (check-logits --tp)
        init_distributed()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mdt = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    mc = load_checkpoint(hf_dir, dtype=mdt, layer_spec=layer_spec).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
    ids, am = input_ids.to(dev), attention_mask.to(dev)
    with torch.no_grad():
        t0 = time.time()
        a = gather_vocab_parallel(gpt_forward(mc, ids, am)).float()[..., : hf.config.vocab_size]
        t1 = time.time()
        b = hf(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits.float()
        t2 = time.time()
    keep = am.bool()
    diff = (a[keep] - b[keep]).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "logit_scale": b[keep].abs().max().item(), "megatron_s": t1 - t0, "hf_s": t2 - t1,
            "tokens": int(keep.sum())}


def check(hf_dir: str) -> tuple[dict, str]:
    """(comparison, what was compared) on the checkpoint's kind of prompt at the current layout."""
    import transformers

    from megatron_rl.models.hf_config import arch_from_hf_config
    if arch_from_hf_config(hf_dir).is_vl:       # image + text prompts (models/vl/parity.py)
        from megatron_rl.models.vl.parity import check_vl
        return check_vl(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    return", "1 + 1 = 2, 2 + 2 ="]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    res = compare_logits(hf_dir, enc["input_ids"], enc["attention_mask"])
    return res, f"{res['tokens']} tokens"


def _tp_worker(rank, world, port, hf_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world, backend="gloo")
    res = check(hf_dir)
    if rank == 0:
        queue.put(res)
    destroy_distributed()


def check_tp(hf_dir: str, tp: int) -> tuple[dict, str]:
    """`check` at TP=`tp` in `tp` spawned gloo processes (CPU)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_tp_worker, args=(tp, port, str(hf_dir), queue), nprocs=tp, start_method="spawn", join=True)
    return queue.get()


def main(hf_dir: str, tol: float = 1e-3, tp: int = 1) -> int:
    if tp < 1:
        raise ValueError(f"check-logits --tp {tp}: must be >= 1")
    res, what = check(hf_dir) if tp == 1 else check_tp(hf_dir, tp)
    ok = res["max_abs_diff"] < tol
    print(f"Megatron (TP={tp}) vs transformers logits on {what}: max abs diff "
          f"{res['max_abs_diff']:.3e}, mean {res['mean_abs_diff']:.3e} (tolerance {tol}): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1
