"""Megatron vs HF transformers logits on the same tokens (the foundation's acceptance check)."""
from __future__ import annotations

import time

import torch


def compare_logits(hf_dir, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   dtype=torch.float32, layer_spec: str = "local") -> dict:
    """Single-process TP=1 comparison; returns max/mean abs diff over real tokens."""
    import transformers

    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward, position_ids_from_mask
    from megatron_rl.parallel import init_distributed

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    init_distributed()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mdt = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    mc = load_checkpoint(hf_dir, dtype=mdt, layer_spec=layer_spec).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
    ids, am = input_ids.to(dev), attention_mask.to(dev)
    with torch.no_grad():
        t0 = time.time()
        a = gpt_forward(mc, ids, am).float()[..., : hf.config.vocab_size]
        t1 = time.time()
        b = hf(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits.float()
        t2 = time.time()
    keep = am.bool()
    diff = (a[keep] - b[keep]).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "logit_scale": b[keep].abs().max().item(), "megatron_s": t1 - t0, "hf_s": t2 - t1,
            "tokens": int(keep.sum())}


def main(hf_dir: str, tol: float = 1e-3) -> int:
    import transformers

    from megatron_rl.models.hf_config import arch_from_hf_config
    if arch_from_hf_config(hf_dir).is_vl:       # image + text prompts (models/vl/parity.py)
        from megatron_rl.models.vl.parity import main as vl_main
        return vl_main(hf_dir, tol)

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    return", "1 + 1 = 2, 2 + 2 ="]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    res = compare_logits(hf_dir, enc["input_ids"], enc["attention_mask"])
    ok = res["max_abs_diff"] < tol
    print(f"Megatron vs transformers logits on {res['tokens']} tokens: max abs diff "
          f"{res['max_abs_diff']:.3e}, mean {res['mean_abs_diff']:.3e} (tolerance {tol}): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1
