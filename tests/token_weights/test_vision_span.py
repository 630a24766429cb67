"""VGR over the vision span of a tiny random Qwen2.5-VL: the context columns are the image
pads (found by token id), and the recomputed response rows over the prompt (image columns
included) equal transformers' full eager attention, at TP=1, TP=2 and PP=2 (gloo)."""
import pytest
import torch

from tests.helpers import run_multiproc
from tests.models.vl_fixtures import processed_batch, tiny_qwen2_5_vl

R = 5
LAST_K = 2          # both layers of 2: under PP=2 each stage owns one
LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def _inputs(vl_dir):
    """Left-padded image prompts (processor output) ++ random responses, one right-padded."""
    from megatron_rl.data.multimodal import ImageBatch

    b = processed_batch(vl_dir)
    g = torch.Generator().manual_seed(0)
    resp = torch.randint(20, 60, (2, R), generator=g)
    resp_mask = torch.ones(2, R, dtype=torch.long)
    resp_mask[1, 3:] = 0
    ids = torch.cat([b["input_ids"], resp], 1)
    am = torch.cat([b["attention_mask"], resp_mask], 1)
    return ids, am, b["input_ids"].shape[1], ImageBatch(b["pixel_values"], b["image_grid_thw"]), b


def _reference(vl_dir):
    import transformers

    ids, am, p, images, b = _inputs(vl_dir)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_dir, attn_implementation="eager",
                                                                           dtype=torch.float32)
    mm = torch.cat([b["mm_token_type_ids"], torch.zeros(2, R, dtype=torch.int)], 1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, pixel_values=images.pixel_values,
                    image_grid_thw=images.image_grid_thw, mm_token_type_ids=mm, output_attentions=True)
    att = torch.stack(out.attentions)                               # [layers, b, heads, s, s]
    return att[-LAST_K:, :, :, p:, :p].mean(2)                      # [k, b, R, P]


def _rows(rank, world, vl_dir, out):
    from megatron.core import parallel_state as mpu

    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.token_weights.attention_rows import attention_rows, selected_layer_numbers

    ids, am, p, images, _ = _inputs(vl_dir)
    mb = {"input_ids": ids, "attention_mask": am, "prompt_len": torch.tensor(p), "images": images}
    for tp, pp in LAYOUTS:
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        init_distributed(tp=tp, pp=pp)
        model = load_checkpoint(vl_dir, layer_spec="local")
        rows = attention_rows(model, mb, selected_layer_numbers(2, LAST_K),
                              lambda m, b: gpt_forward(m, b["input_ids"], b["attention_mask"], images=b["images"]),
                              row_chunk=2)
        torch.save(rows, f"{out}.tp{tp}pp{pp}.{rank}")
    destroy_distributed()


def _pad_id(vl_dir) -> int:
    import transformers
    return transformers.AutoTokenizer.from_pretrained(vl_dir).convert_tokens_to_ids("<|image_pad|>")


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl_span"))


def test_vision_span_is_the_image_pads_by_token_id(vl_dir):
    import transformers

    from megatron_rl.token_weights.config import TokenWeightsConfig
    from megatron_rl.token_weights.context import ContextFinder

    tok = transformers.AutoTokenizer.from_pretrained(vl_dir)
    finder = ContextFinder(tok, TokenWeightsConfig().context_markers)     # the default pairs include the vision one
    assert finder.id_markers == [(tok.convert_tokens_to_ids("<|vision_start|>"),
                                  tok.convert_tokens_to_ids("<|vision_end|>"))]
    ids, am, p, _, _ = _inputs(vl_dir)
    ctx, ins = finder(ids[:, :p], am[:, :p])
    pads = ids[:, :p] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(ctx.bool(), pads) and int(pads.sum()) == 16 + 15
    markers = (ids[:, :p] == tok.convert_tokens_to_ids("<|vision_start|>")) | (
        ids[:, :p] == tok.convert_tokens_to_ids("<|vision_end|>"))
    assert torch.equal(ins.bool(), am[:, :p].bool() & ~pads & ~markers)


@pytest.mark.multiproc
def test_vision_span_rows_match_full_attention_at_tp1_tp2_and_pp2(tmp_path, vl_dir):
    run_multiproc(_rows, 2, (vl_dir, str(tmp_path / "rows.pt")))
    ref = _reference(vl_dir)
    ids, am, p, _, _ = _inputs(vl_dir)
    valid = am[:, p:].bool()
    pads = ids[:, :p] == _pad_id(vl_dir)
    for tp, pp in LAYOUTS:
        for rank in range(2):
            rows = torch.load(tmp_path / f"rows.pt.tp{tp}pp{pp}.{rank}")
            assert rows.shape == ref.shape
            assert (rows - ref)[:, valid].abs().max() < 1e-5, f"tp={tp} pp={pp} rank {rank}"
            # the image span's share of each response row, what VGR weighs against the instruction
            span = (rows * pads[None, :, None, :]).sum(-1)
            span_ref = (ref * pads[None, :, None, :]).sum(-1)
            assert (span - span_ref)[:, valid].abs().max() < 1e-5
