"""`token_weights.source: vgr`: the phase's weights equal `vgr_token_weights` applied to the
full HF attention maps of the same model (TP=1, float32), and a training run uses them."""
import json

import pytest
import torch

from tests.token_weights.conftest import PROMPTS


def _batch(tok, n_resp=5, seed=0):
    from megatron_rl.data.batch import Batch

    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    g = torch.Generator().manual_seed(seed)
    resp = torch.randint(7, len(tok), (len(PROMPTS), n_resp), generator=g)
    mask = torch.ones(len(PROMPTS), n_resp)
    mask[1, 3:] = 0
    return Batch({"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "response_ids": resp,
                  "response_mask": mask, "advantages": torch.randn(len(PROMPTS), n_resp, generator=g)},
                 [{"uid": str(i)} for i in range(len(PROMPTS))])


def _reference(hf, batch, ctx, ins, last_k, clip):
    import transformers

    from megatron_rl.algos.vgr import vgr_token_weights
    from megatron_rl.trainer.microbatch import model_inputs

    ids, am = model_inputs(batch)
    p = batch["prompt_ids"].shape[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                    output_attentions=True).attentions
    rows = [a[:, :, p:, :p] for a in att]                               # the full matrix, sliced afterwards
    return vgr_token_weights(rows, ctx, ins, batch["response_mask"], last_k=last_k, clip=clip,
                             prompt_mask=batch["prompt_mask"])     # weights 1 without context: its rule too


def test_phase_weights_equal_vgr_of_the_full_attention_matrix(tiny_hf):
    import transformers

    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.token_weights import TokenWeightsConfig
    from megatron_rl.token_weights.phase import VGRWeights
    from megatron_rl.trainer.policy import Policy

    init_distributed()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf)
    policy = Policy(load_checkpoint(tiny_hf, layer_spec="local"), micro_batch_size=4)
    cfg = TokenWeightsConfig(source="vgr", last_k_layers=2, micro_batch_size=3, row_chunk=2, clip=[0.5, 2.0],
                             context_markers=[["<document>", "</document>"]])
    phase = VGRWeights(cfg, policy, tok)
    batch = _batch(tok)
    metrics = phase(None, batch)
    ctx, ins = phase.find_context(batch["prompt_ids"], batch["prompt_mask"])
    ref = _reference(tiny_hf, batch, ctx, ins, 2, (0.5, 2.0))
    assert batch["token_weights"].dtype == torch.float32
    assert (batch["token_weights"] - ref).abs().max() < 1e-4
    assert torch.equal(batch["token_weights"][2], torch.ones(5))       # prompt without context: weights 1
    assert batch["token_weights"][1, 3:].abs().sum() == 0             # padding stays 0
    assert not torch.allclose(batch["token_weights"][0], torch.ones(5))
    for key in ("mean", "std", "min", "max", "clip_frac", "adv_corr"):
        assert f"token_weights/{key}" in metrics
    assert 0.5 <= metrics["token_weights/min"] <= metrics["token_weights/max"] <= 2.0


def test_phase_multiplies_weights_already_in_the_batch(tiny_hf):
    import transformers

    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed
    from megatron_rl.token_weights import TokenWeightsConfig
    from megatron_rl.token_weights.phase import VGRWeights
    from megatron_rl.trainer.policy import Policy

    init_distributed()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf)
    policy = Policy(load_checkpoint(tiny_hf, layer_spec="local"), micro_batch_size=4)
    phase = VGRWeights(TokenWeightsConfig(source="vgr", last_k_layers=2), policy, tok)
    plain, prior = _batch(tok), _batch(tok)
    prior["token_weights"] = torch.full((4, 5), 0.5)
    phase(None, plain)
    phase(None, prior)
    assert torch.allclose(prior["token_weights"], 0.5 * plain["token_weights"])


def test_training_with_vgr_logs_weight_metrics(tiny_vgr_run):
    from megatron_rl.trainer.main import train_main

    overrides, run_dir = tiny_vgr_run
    assert train_main(None, overrides) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["token_weights/mean"] == pytest.approx(1.0, abs=0.35)   # mean 1 per sequence before clipping
        assert 0.2 <= r["token_weights/min"] <= r["token_weights/max"] <= 3.0
        assert "timing/token_weights" in r and "token_weights/adv_corr" in r
