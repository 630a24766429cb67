"""Per-token log-probs and entropies of a context-parallel forward, back in the `[n, R]` layout.

Under `model.cp > 1` the model's output holds this CP rank's share of the positions
(parallel/context_parallel.py). The next-token labels are taken from the whole sequence
before it is split, log-prob and entropy are computed on the local positions only (the
fused vocab-parallel kernel), and the two `[b, s/cp]` results are all-gathered over CP (one
collective) and put back in order: from there on a micro-batch is cp=1's, so loss
aggregation and everything downstream is unchanged and identical on every CP rank.
"""
from __future__ import annotations

import torch

from megatron_rl.kernels import token_logprob_entropy
from megatron_rl.parallel.context_parallel import CPLayout, cp_rank, cp_size, pad_sequence_dim
from megatron_rl.parallel.pipeline import tp_group
from megatron_rl.trainer.microbatch import mask_padded_vocab, scatter_rows


def cp_token_stats(output: torch.Tensor, mb: dict, vocab_size: int, temperature: float,
                   backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob, entropy) `[rows, R]` of the response tokens, as `Policy._token_stats` at cp=1."""
    cp = cp_size()
    if "packed" in mb:
        pk = mb["packed"]
        layout = CPLayout.packed(pk.cu_seqlens, cp, cp_rank())
        labels = pk.next_token_labels()                                      # [1, T]
    else:
        ids = pad_sequence_dim(mb["input_ids"], 2 * cp)
        layout = CPLayout.padded(ids.size(1), cp, cp_rank(), device=ids.device)
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1))                  # [b, s']: the next token
    logits = mask_padded_vocab(output, vocab_size)                            # [b, s'/cp, V/tp]
    lp, ent = token_logprob_entropy(logits, layout.shard(labels), tp_group=tp_group(),
                                    temperature=temperature, backend=backend)
    both = layout.gather(torch.stack([lp, ent], -1))                          # [b, s', 2]
    if "packed" in mb:
        picked = both[0, mb["score_pos"]]
        return scatter_rows(picked[:, 0], mb), scatter_rows(picked[:, 1], mb)
    p, r = int(mb["prompt_len"]), mb["labels"].shape[1]
    resp = both[:, p - 1: p - 1 + r]
    return resp[..., 0], resp[..., 1]
