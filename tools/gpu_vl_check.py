"""GPU check of the vision-language model (issue 25): a tiny random Qwen2.5-VL on one GPU,
float32 and bfloat16: Megatron vs transformers logits on image prompts, native-engine greedy
generation vs transformers' `generate`, and an update with the tower trained.

    python3 -m torch.distributed.run --standalone --nproc-per-node 1 tools/gpu_vl_check.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import transformers

    from megatron_rl.data.multimodal import ImageBatch
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.models.vl.parity import compare_vl_logits
    from tests.models.vl_fixtures import engine_greedy, hf_greedy, processed_batch, tiny_qwen2_5_vl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        hf = tiny_qwen2_5_vl(Path(tmp) / "hf")
        enc = processed_batch(hf)
        for spec in ("local", "sdpa"):
            res = compare_vl_logits(hf, enc, layer_spec=spec)
            good = res["max_abs_diff"] < 1e-3
            ok &= good
            print(f"logits fp32 spec={spec}: max abs diff {res['max_abs_diff']:.2e} over {res['tokens']} tokens "
                  f"({res['image_tokens']} image): {'OK' if good else 'FAIL'}")
        res = compare_vl_logits(hf, enc, dtype=torch.bfloat16, layer_spec="sdpa")
        print(f"logits bf16 spec=sdpa: max abs diff {res['max_abs_diff']:.2e} (scale {res['logit_scale']:.2f})")
        cuda = {k: v.cuda() for k, v in enc.items()}
        ref, ref_lp = hf_greedy(hf, {k: v.cpu() for k, v in cuda.items()})
        got, lp = engine_greedy(hf, cuda)
        good = torch.equal(got.cpu(), ref.cpu()) and (lp.cpu() - ref_lp.cpu()).abs().max().item() < 1e-3
        ok &= good
        print(f"engine greedy vs generate: tokens equal {torch.equal(got.cpu(), ref.cpu())}, "
              f"max log-prob diff {(lp.cpu() - ref_lp.cpu()).abs().max().item():.2e}: {'OK' if good else 'FAIL'}")
        model = load_model_chunks(hf, freeze_vision=False)[0]
        before = model.visual.patch_embed.proj.weight.detach().clone()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
        from megatron_rl.models.vl.forward import vl_forward
        out = vl_forward(model, cuda["input_ids"], cuda["attention_mask"],
                         ImageBatch(cuda["pixel_values"], cuda["image_grid_thw"]))
        out.float().log_softmax(-1)[..., 5].mean().backward()
        opt.step()
        moved = (model.visual.patch_embed.proj.weight - before).abs().max().item()
        ok &= moved > 0
        print(f"trained tower moved by {moved:.2e}: {'OK' if moved > 0 else 'FAIL'}")
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    from megatron_rl.parallel import init_distributed
    init_distributed()
    sys.exit(main())
