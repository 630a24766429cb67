"""Train a tiny `LlamaForSequenceClassification` for a few seconds to prefer one token,
as a reward model for CPU tests and demos (its score rises with the token's share).

    python tools/make_toy_reward_model.py --tokenizer POLICY_DIR --token 4 --out /tmp/toy_rm

The tokenizer is copied from POLICY_DIR, so `reward.model.template: auto` scores the
policy's own token ids. Regression on `scale x (share of the token in the sequence)`,
read at the last token, as the reward model will be.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def make_toy_reward_model(out: str, tokenizer_dir: str, token: str, *, steps: int = 300, seed: int = 0,
                          hidden: int = 32, layers: int = 2, max_len: int = 24, scale: float = 4.0) -> dict:
    """Returns {'final_loss', 'seconds'}; writes the checkpoint and tokenizer to `out`."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    target = tok.convert_tokens_to_ids(token)
    if target is None or target == tok.unk_token_id:
        raise ValueError(f"--token {token!r} is not one token of {tokenizer_dir}'s vocabulary")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    vocab = len(tok)
    model_cfg = Path(tokenizer_dir) / "config.json"     # a policy directory: cover every id it can emit
    if model_cfg.exists():
        vocab = max(vocab, json.loads(model_cfg.read_text()).get("vocab_size", 0))
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=128, num_labels=1, pad_token_id=pad,
                                   tie_word_embeddings=False, architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.tensor([i for i in range(vocab) if i not in (pad, target)])
    t0, loss = time.time(), torch.tensor(0.0)
    for _ in range(steps):
        b = 32
        lengths = torch.randint(4, max_len + 1, (b,), generator=g)
        ids = ordinary[torch.randint(0, len(ordinary), (b, max_len), generator=g)]
        share = torch.rand(b, generator=g)          # each row its own share of the target token
        ids = torch.where(torch.rand(b, max_len, generator=g) < share[:, None], target, ids)
        am = (torch.arange(max_len)[None] < lengths[:, None]).long()
        ids = torch.where(am > 0, ids, pad)
        label = scale * ((ids == target) & (am > 0)).sum(-1).float() / lengths.float()
        pred = model(input_ids=ids, attention_mask=am).logits[:, 0]
        loss = torch.nn.functional.mse_loss(pred, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"final_loss": float(loss.detach()), "seconds": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="directory of the policy's tokenizer")
    ap.add_argument("--token", required=True, help="the token the reward model prefers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    res = make_toy_reward_model(a.out, a.tokenizer, a.token, steps=a.steps, seed=a.seed)
    print(f"toy reward model -> {a.out}: mse {res['final_loss']:.4f} after {a.steps} steps ({res['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
