"""A tiny, fully offline training set-up: a random tiny Llama whose directory also
holds a word-level tokenizer with a chat template, prompts and a reward file."""
from __future__ import annotations

import pytest

from megatron_rl.data.writers import write_jsonl
from tests.helpers import make_tiny_hf, write_word_tokenizer

WORDS = "what is one two three four five plus ? give the number answer yes no 0 1 2 3 4 5 6 7 8 9".split()
REWARD_FILE = '''
def count_fours(response, sample, **kw):
    """1 point per '4' in the response, at most 1."""
    return min(1.0, response.split().count("4") * 0.5)
'''


def write_tokenizer(out_dir) -> None:
    write_word_tokenizer(out_dir, WORDS)


@pytest.fixture
def tiny_run(tmp_path):
    """(overrides list, run_dir) for `train_main(None, overrides)`."""
    hf = make_tiny_hf(tmp_path / "model", "llama", tie=True)
    write_tokenizer(hf)
    data = tmp_path / "data"
    data.mkdir()
    qs = ["what is two plus two ?", "what is one plus three ?", "give the number four",
          "what is three plus one ?"]
    for split, n in (("train", 16), ("val", 4)):
        write_jsonl(data / f"{split}.jsonl", [{"prompt": qs[i % len(qs)], "ground_truth": "4"} for i in range(n)])
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    overrides = [f"model.path={hf}", "model.layer_spec=local", f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.val_files=[{data / 'val.jsonl'}]", "data.train_batch_size=2", "data.max_prompt_length=16",
                 "rollout.n=2", "rollout.max_new_tokens=5", "actor.micro_batch_size=2", "actor.optim.lr=1e-3",
                 "reward.name=fours", f"reward.custom_functions={{fours: '{tmp_path / 'reward.py'}:count_fours'}}",
                 "reward.num_workers=0", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]",
                 "trainer.total_steps=3", "trainer.seed=3", "trainer.deterministic=true"]
    return overrides, run_dir
