"""Megatron logits equal HF transformers' on the same tokens (float32, CPU)."""
from pathlib import Path

import pytest
import torch

from megatron_rl.models.parity import compare_logits
from tests.helpers import make_tiny_hf


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_tiny_model_logits_match_transformers(tmp_path, family, tie):
    hf = make_tiny_hf(tmp_path / "hf", family, tie=tie)
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :5] = 0      # left padding
    res = compare_logits(hf, ids, am)
    assert res["max_abs_diff"] < 1e-4


def test_llama3_rope_scaling_is_supported(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    ids = torch.randint(0, 96, (1, 16))
    assert compare_logits(hf, ids)["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    from tools.fetch_demo_model import fetch
    import transformers

    hf = fetch()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    enc = tok(["The capital of France is", "def f(x):\n    return x"], return_tensors="pt",
              padding=True, padding_side="left")
    res = compare_logits(hf, enc["input_ids"], enc["attention_mask"])
    assert res["max_abs_diff"] < 1e-3
