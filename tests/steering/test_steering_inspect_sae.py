"""tools/inspect_sae.py: config summary and promoted tokens through the unembedding."""
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_hf
from tests.steering.conftest import make_sae
from tools.inspect_sae import main

FIX = Path(__file__).parent / "fixtures"


def _tokenizer(hf_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"tok{i}": i for i in range(96)}, unk_token="tok0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="tok0").save_pretrained(hf_dir)


def test_prints_config_without_model(capsys):
    assert main([str(FIX / "topk")]) == 0
    out = capsys.readouterr().out
    assert "architecture=topk d_in=16 d_sae=32" in out and "k=4" in out and "steer layer (0-indexed output) 1" in out


def test_feature_on_an_unembedding_row_promotes_that_token(tmp_path, capsys):
    from megatron_rl.models.hf_io import HFTensorReader
    from megatron_rl.steering import save_sae

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    _tokenizer(hf)
    reader = HFTensorReader(hf)
    u = reader.get("model.embed_tokens.weight")[42] / reader.get("model.norm.weight")   # undo the norm scale
    save_sae(make_sae(rows={5: u}), tmp_path / "sae")
    assert main([str(tmp_path / "sae"), "--model", hf, "--features", "5,6", "--topk", "3"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("feature 5:")][0]
    assert line.startswith("feature 5: 'tok42'")


def test_d_in_mismatch_with_model_names_both(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    with pytest.raises(ValueError, match=r"d_in=16.*hidden size is 64"):
        main([str(FIX / "standard"), "--model", hf])
