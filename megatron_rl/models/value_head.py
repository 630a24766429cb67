"""A scalar head on a GPTModel trunk (critic, reward model, GAD discriminator).

The head reads the final-layernorm hidden state `[s, b, h]` of the last stage, taken with
`models.forward.final_hidden_states` (the LM head then projects one position only; the
model itself is never switched to another mode).
"""
from __future__ import annotations

import torch

from megatron_rl.models.forward import final_hidden_states, gpt_forward
from megatron_rl.models.loading import unwrap
from megatron_rl.parallel.context_parallel import cp_size, gather_padded


class ValueHead(torch.nn.Linear):
    """`Linear(h, 1)` in float32, identical on every rank (seeded init), so TP ranks
    that all see the full hidden state keep identical copies."""

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__(hidden_size, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.weight.normal_(0.0, hidden_size ** -0.5, generator=g)
            self.bias.zero_()


def attach_value_head(model, seed: int = 0) -> ValueHead | None:
    """Register a head as `model.value_head` on the last pipeline stage (so Megatron
    DDP and optimizer see it as part of the model); None on other stages."""
    gpt = unwrap(model)
    if not gpt.post_process:
        return None
    head = ValueHead(gpt.config.hidden_size, seed)
    if torch.cuda.is_available():
        head = head.cuda(torch.cuda.current_device())
    gpt.add_module("value_head", head)
    return head


def value_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position values `[b, s]` float32 on the last stage; the stage's hidden
    states on others (what the pipeline schedule sends on)."""
    gpt = unwrap(model)
    head = getattr(gpt, "value_head", None)
    if head is None:
        return gpt_forward(model, input_ids, attention_mask)
    with final_hidden_states(gpt) as out:
        gpt_forward(model, input_ids, attention_mask)
    values = head(out["hidden"].float()).squeeze(-1).transpose(0, 1)   # [s, b, h] -> [b, s]
    if cp_size() > 1:          # this CP rank's positions -> the whole sequence (parallel/context_parallel.py)
        values = gather_padded(values, input_ids.size(1))
    return values


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b] position of each row's last real token (left-padded prompt ++ right-padded
    response: the last response token, or the last prompt token for an empty response)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask > 0, pos, -1).max(-1).values.clamp(min=0)
