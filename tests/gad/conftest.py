"""A tiny offline GAD task: a random tiny Llama + word-level tokenizer (the trainer
tests' set-up) and prompts whose teacher responses always say "yes yes"."""
from __future__ import annotations

import json

import pytest

from tests.helpers import make_tiny_hf, write_word_tokenizer

TEACHER = "yes yes yes"
WORDS = "what is one two three four five plus ? give the number answer yes no 0 1 2 3 4 5 6 7 8 9".split()
SIGNATURE_REWARD = '''
def says_yes(response, sample, **kw):
    """1 if the response contains the teacher's signature word."""
    return float("yes" in response.split())
'''


def write_tokenizer(out_dir) -> None:
    write_word_tokenizer(out_dir, WORDS)


def write_gad_data(data_dir, n_train=16, n_val=4, missing_line=None) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    qs = ["what is two plus two ?", "what is one plus three ?", "give the number four", "what is three plus one ?"]
    for split, n in (("train", n_train), ("val", n_val)):
        with open(data_dir / f"{split}.jsonl", "w") as f:
            for i in range(n):
                rec = {"prompt": qs[i % len(qs)], "answer": TEACHER}
                if split == "train" and missing_line is not None and i + 1 == missing_line:
                    del rec["answer"]
                f.write(json.dumps(rec) + "\n")


@pytest.fixture
def gad_tokenizer(tmp_path):
    import transformers

    write_tokenizer(tmp_path / "tok")
    return transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")


@pytest.fixture
def gad_run(tmp_path):
    """(overrides, run_dir): a 16-prompt task, teacher field `answer`, rule reward = signature."""
    hf = make_tiny_hf(tmp_path / "model", "llama", tie=True, vocab_size=40)
    write_tokenizer(hf)
    data = tmp_path / "data"
    write_gad_data(data)
    (tmp_path / "reward.py").write_text(SIGNATURE_REWARD)
    run_dir = tmp_path / "run"
    overrides = [f"model.path={hf}", "model.layer_spec=local", f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.val_files=[{data / 'val.jsonl'}]", "data.train_batch_size=4", "data.max_prompt_length=16",
                 "data.teacher_response_key=answer",
                 "rollout.n=8", "rollout.max_new_tokens=4", "actor.micro_batch_size=16", "actor.optim.lr=5e-3",
                 "reward.name=says_yes", f"reward.custom_functions={{says_yes: '{tmp_path / 'reward.py'}:says_yes'}}",
                 "reward.num_workers=0", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]",
                 "gad.enable=true", "gad.log_rule_reward=true", "gad.d_micro_batch_size=18", "gad.d_lr=1e-4", "trainer.seed=3", "trainer.deterministic=true",
                 "trainer.val_before_train=false"]
    return overrides, run_dir


def run_gad(overrides):
    """Build the GAD trainer from dotted overrides, train, return the metric rows."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.gad import build_gad_trainer

    cfg = load_experiment_config(None, overrides)
    trainer = build_gad_trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    with open(f"{cfg.logging.run_dir}/metrics.jsonl") as f:
        return [json.loads(x) for x in f]
