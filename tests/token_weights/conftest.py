"""A tiny offline set-up for VGR: a random tiny Llama whose directory holds a word-level
tokenizer; prompts with a `<document>` span and a question after it."""
from __future__ import annotations

import pytest

from megatron_rl.data.writers import write_jsonl
from tests.helpers import make_tiny_hf, write_word_tokenizer

WORDS = ("<document> </document> anna ben lives in rome oslo paris where does live ? answer the 0 1 2 3 4 5"
         ).split()
PROMPTS = ["<document> anna lives in rome ben lives in oslo </document> where does anna live ?",
           "<document> ben lives in paris anna lives in oslo </document> where does ben live ?",
           "answer the ? where does ben live",                          # no context span
           "<document> anna lives in oslo </document> answer the ?"]
REWARD_FILE = '''
def says_rome(response, sample, **kw):
    return float("rome" in response.split())
'''


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    hf = make_tiny_hf(tmp_path_factory.mktemp("tw_model"), "llama", tie=True)
    write_word_tokenizer(hf, WORDS)
    return hf


@pytest.fixture
def tiny_vgr_run(tmp_path, tiny_hf):
    """(overrides, run_dir) for `train_main(None, overrides)` with VGR weights on."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("val", 2)):
        write_jsonl(data / f"{split}.jsonl", [{"prompt": PROMPTS[i % len(PROMPTS)], "ground_truth": "rome"}
                                              for i in range(n)])
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    overrides = [f"model.path={tiny_hf}", "model.layer_spec=local", f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.val_files=[{data / 'val.jsonl'}]", "data.train_batch_size=4", "data.max_prompt_length=32",
                 "rollout.n=2", "rollout.max_new_tokens=4", "actor.micro_batch_size=4", "actor.optim.lr=1e-3",
                 "reward.name=rome", f"reward.custom_functions={{rome: '{tmp_path / 'reward.py'}:says_rome'}}",
                 "reward.num_workers=0", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]",
                 "trainer.total_steps=2", "trainer.seed=3", "trainer.val_before_train=false",
                 "token_weights.source=vgr", "token_weights.last_k_layers=2", "token_weights.micro_batch_size=3",
                 "token_weights.row_chunk=3", "token_weights.context_markers=[[<document>, </document>]]"]
    return overrides, run_dir
