"""Recomputed response rows equal the prompt-column slice of the full attention matrix
(HF eager attention of the same checkpoint), at TP=1, TP=2 and PP=2 (gloo)."""
import pytest
import torch

from tests.helpers import make_tiny_hf, run_multiproc

B, P, R = 3, 7, 5
LAST_K = 3          # layers 2..4 of 4: under PP=2 both stages own some


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (B, P + R), generator=g)
    am = torch.ones(B, P + R, dtype=torch.long)
    am[1, :3] = 0            # left-padded prompt
    am[2, P + 3:] = 0        # right-padded response
    return ids, am


def _reference(hf):
    import transformers

    ids, am = _inputs()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager", dtype=torch.float32)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        att = torch.stack(model(input_ids=ids, attention_mask=am, position_ids=pos, output_attentions=True).attentions)
    return att[-LAST_K:, :, :, P:, :P].mean(2)       # [k, b, R, P], heads averaged


LAYOUTS = [(1, 1, "local"), (1, 1, "sdpa"), (2, 1, "local"), (1, 2, "local")]   # (tp, pp, layer spec)


def _rows(rank, world, hf, out):
    """Every layout in the same two processes: Megatron's groups are rebuilt, gloo's stays."""
    from megatron.core import parallel_state as mpu

    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.token_weights.attention_rows import attention_rows, selected_layer_numbers

    ids, am = _inputs()
    mb = {"input_ids": ids, "attention_mask": am, "prompt_len": torch.tensor(P)}
    for tp, pp, spec in LAYOUTS:
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        init_distributed(tp=tp, pp=pp)
        model = load_checkpoint(hf, layer_spec=spec)
        rows = attention_rows(model, mb, selected_layer_numbers(4, LAST_K),
                              lambda m, b: gpt_forward(m, b["input_ids"], b["attention_mask"]), row_chunk=2)
        torch.save(rows, f"{out}.tp{tp}pp{pp}{spec}.{rank}")
    destroy_distributed()


@pytest.mark.multiproc
def test_rows_match_full_attention_at_tp1_tp2_and_pp2(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run_multiproc(_rows, 2, (hf, str(tmp_path / "rows.pt")))
    ref = _reference(hf)
    valid = _inputs()[1][:, P:].bool()                # response rows that are real tokens
    for tp, pp, spec in LAYOUTS:
        for rank in range(2):
            rows = torch.load(tmp_path / f"rows.pt.tp{tp}pp{pp}{spec}.{rank}")
            assert rows.shape == (LAST_K, B, R, P)
            assert (rows - ref)[:, valid].abs().max() < 1e-5, f"tp={tp} pp={pp} {spec} rank {rank}"
            # each real response row spreads at most its whole mass over the prompt
            assert bool((rows[:, valid].sum(-1) <= 1 + 1e-5).all())


def test_selected_layers_are_the_last_k():
    from megatron_rl.token_weights.attention_rows import selected_layer_numbers

    assert selected_layer_numbers(30, 4) == [27, 28, 29, 30]
    assert selected_layer_numbers(4, 0) == [1, 2, 3, 4]
    assert selected_layer_numbers(4, 9) == [1, 2, 3, 4]


def test_response_rows_chunking_and_grouped_heads_match_dense_softmax():
    from megatron_rl.token_weights.attention_rows import response_rows

    g = torch.Generator().manual_seed(1)
    s, b, nh, ng, hn, p = 9, 2, 4, 2, 8, 4
    q, k = torch.randn(s, b, nh, hn, generator=g), torch.randn(s, b, ng, hn, generator=g)
    kk = k.repeat_interleave(2, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kk) * 0.3
    scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
    dense = scores.softmax(-1)[:, :, p:, :p].sum(1)
    for chunk in (1, 3, 100):
        assert (response_rows(q, k, None, p, 0.3, chunk) - dense).abs().max() < 1e-6
