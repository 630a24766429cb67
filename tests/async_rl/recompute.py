"""A full-sequence recompute of the response tokens' log-probs (what the rollout log-probs are checked against)."""
from __future__ import annotations

import torch


@torch.no_grad()
def recomputed_logprobs(model, batch) -> torch.Tensor:
    """[B, R] log-probs of the response tokens from one forward over prompt ++ response (the trainer's positions)."""
    from megatron_rl.models.forward import causal_padding_mask, position_ids_from_mask

    ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["response_attention_mask"]], 1)
    model.eval()
    logits = model(ids, position_ids_from_mask(am), causal_padding_mask(am)).float()
    p, r = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    lp = torch.log_softmax(logits[:, p - 1: p + r - 1], -1)
    return lp.gather(-1, batch["response_ids"][..., None])[..., 0] * batch["response_mask"]
