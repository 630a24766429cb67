"""TE's fused RoPE against Megatron's unfused one on the same tensors (models/rope_fusion.py).

float32 inputs isolate the kernel (expected ~1e-6); bf16 shows the rounding difference the
e2e model sees (the fused kernel computes in fp32 and rounds once). Needs CUDA and TE.

    python tools/check_rope_fusion.py
"""
from __future__ import annotations

import torch


def main() -> None:
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    s, b, h, d = 280, 4, 32, 64
    freqs = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=130000).cuda()(s)   # [s, 1, 1, d]
    print("| dtype | layout | max abs diff | mean abs diff | max abs value |\n|---|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(0)
        t = torch.randn(s, b, h, d, device="cuda", generator=g).to(dtype)
        ref = rope_utils._apply_rotary_pos_emb_bshd(t.float(), freqs)          # fp32 math on the same input
        for name, out in (("sbhd fused", rope_utils.fused_apply_rotary_pos_emb(t, freqs)),
                          ("sbhd unfused", rope_utils._apply_rotary_pos_emb_bshd(t, freqs))):
            diff = (out.float() - ref).abs()
            print(f"| {str(dtype)[6:]} | {name} vs fp32 unfused | {diff.max():.2e} | {diff.mean():.2e} | "
                  f"{ref.abs().max():.2f} |")
        cu = torch.tensor([0, 100, 280], device="cuda", dtype=torch.int32)
        tt = t[:, 0]                                                            # [t, h, d] packed
        out = rope_utils.fused_apply_rotary_pos_emb_thd(tt, cu, freqs)
        ref = torch.cat([rope_utils._apply_rotary_pos_emb_bshd(tt[a:e, None].float(), freqs[: e - a])[:, 0]
                         for a, e in ((0, 100), (100, 280))])
        diff = (out.float() - ref).abs()
        print(f"| {str(dtype)[6:]} | thd fused vs fp32 unfused per segment | {diff.max():.2e} | {diff.mean():.2e} | "
              f"{ref.abs().max():.2f} |")


if __name__ == "__main__":
    main()
