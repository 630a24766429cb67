"""A sequence-classification reward model on Megatron scores as transformers does
(float32, CPU, right-padded rows of different lengths), at TP=1 and TP=2 (gloo)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_LLAMA, run_multiproc

PAD = 0


def make_tiny_rm(out_dir, family: str = "llama", seed: int = 0) -> str:
    """A random tiny `*ForSequenceClassification` with one label, saved by transformers."""
    import transformers

    cfg = dict(TINY_LLAMA, tie_word_embeddings=False, num_labels=1, pad_token_id=PAD)
    if family == "qwen2":
        cfg.update(architectures=["Qwen2ForSequenceClassification"], model_type="qwen2")
        model_cls, config = transformers.Qwen2ForSequenceClassification, transformers.Qwen2Config(**cfg)
    elif family == "qwen3":
        cfg.update(architectures=["Qwen3ForSequenceClassification"], model_type="qwen3", head_dim=24)
        model_cls, config = transformers.Qwen3ForSequenceClassification, transformers.Qwen3Config(**cfg)
    else:
        cfg.update(architectures=["LlamaForSequenceClassification"])
        model_cls, config = transformers.LlamaForSequenceClassification, transformers.LlamaConfig(**cfg)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    model.save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)


def right_padded_batch():
    g = torch.Generator().manual_seed(1)
    lengths = [11, 7, 3, 9, 5]
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 96, (n,), generator=g)
        am[i, :n] = 1
    return ids, am


def hf_scores(path, ids, am) -> torch.Tensor:
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=am).logits[:, 0].float()


def _tp_worker(rank, world, path, expected):
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rewards.reward_model import load_reward_model

    init_distributed(tp=world)
    rm = load_reward_model(path, micro_batch_size=2, tokenizer=False)
    ids, am = right_padded_batch()
    got = rm.score(ids, am)
    assert got.shape == (5,)
    assert (got - expected).abs().max().item() < 1e-4, (got, expected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_scores_equal_transformers_tp1(tmp_path, family):
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rewards.reward_model import load_reward_model

    path = make_tiny_rm(tmp_path / "rm", family)
    ids, am = right_padded_batch()
    expected = hf_scores(path, ids, am)
    init_distributed()
    rm = load_reward_model(path, micro_batch_size=2, tokenizer=False)
    got = rm.score(ids, am)
    assert (got - expected).abs().max().item() < 1e-4
    # left padding scores the same rows identically (positions count real tokens)
    left_ids, left_am = torch.full_like(ids, PAD), torch.zeros_like(am)
    for i in range(len(ids)):
        n = int(am[i].sum())
        left_ids[i, -n:], left_am[i, -n:] = ids[i, :n], 1
    assert (rm.score(left_ids, left_am) - expected).abs().max().item() < 1e-4


def test_offloaded_reward_model_scores_the_same(tmp_path):
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rewards.reward_model import load_reward_model

    path = make_tiny_rm(tmp_path / "rm", "llama")
    ids, am = right_padded_batch()
    init_distributed()
    rm = load_reward_model(path, micro_batch_size=4, tokenizer=False, offload=True)
    assert rm.offloader.is_offloaded
    got = rm.score(ids, am)
    assert rm.offloader.is_offloaded            # back in host memory after the pass
    assert (got - hf_scores(path, ids, am)).abs().max().item() < 1e-4


def test_refuses_multi_label_and_causal_lm(tmp_path):
    import json

    from megatron_rl.rewards.reward_model import trunk_hf_config

    path = make_tiny_rm(tmp_path / "rm", "llama")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "a", "1": "b"},
                                                              "num_labels": 2}))
    with pytest.raises(ValueError, match="num_labels=2"):
        trunk_hf_config(path)
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        trunk_hf_config(path)


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scores_equal_transformers_tp2(tmp_path, family):
    path = make_tiny_rm(tmp_path / "rm", family)
    ids, am = right_padded_batch()
    run_multiproc(_tp_worker, world=2, args=(path, hf_scores(path, ids, am)))
