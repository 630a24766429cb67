"""A tiny offline model plus a verl-schema GSM8K-style parquet, as verl's
`examples/data_preprocess/gsm8k.py` writes it."""
from __future__ import annotations

import pytest

from tests.helpers import make_tiny_hf, write_word_tokenizer

WORDS = "what is one two three four five plus ? give the number answer yes no 0 1 2 3 4 5 6 7 8 9 ####".split()
QUESTIONS = ["what is two plus two ?", "what is one plus three ?", "give the number four", "what is three plus one ?"]


def verl_gsm8k_rows(n: int, split: str) -> list[dict]:
    """Rows with exactly verl's GSM8K preprocessing columns (no top-level ground_truth)."""
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        rows.append({"data_source": "openai/gsm8k",
                     "prompt": [{"role": "user", "content": q}],
                     "ability": "math",
                     "reward_model": {"style": "rule", "ground_truth": str(4 + i % 2)},
                     "extra_info": {"split": split, "index": i, "answer": f"#### {4 + i % 2}", "question": q}})
    return rows


def write_parquet(path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture
def tiny_model(tmp_path):
    hf = make_tiny_hf(tmp_path / "model", "llama", tie=True)
    write_word_tokenizer(hf, WORDS)
    return hf
