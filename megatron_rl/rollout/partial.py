"""Partial rollouts: an in-flight native-engine generation stopped between two decode steps
(after `budget` decode steps of the call, counted over all its chunks, or when an `interrupt`
callable says so), the engine's weights updated, and the generation
continued under the new weights. What the orchestration (fully async, `partial_rollout`) calls:

    out = engine.generate(batch, sp, budget=None, interrupt=None)  # Batch, or PartialRollout if stopped
    engine.update_weights(named_tensors); engine.policy_version = k + 1
    out = engine.resume(out, sp, budget=None, interrupt=None)      # Batch, or PartialRollout again

Every response token is tagged with the `engine.policy_version` that sampled it
(`batch["policy_version"]` [B, R] long, -1 on padding) and its `rollout_logprob` is that
version's. On resume the KV cache is rebuilt by one prefill of prompt ++ tokens so far under the
current weights (the old cache belongs to the old policy), then decoding goes on from the saved
generator state: without a weight update in between, the draws continue the same stream.
`interrupt` is called once per decode step on every rank of the engine's model-parallel group;
the ranks stop together when any of them asks (one all-reduce per step, only when it is given).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams

Interrupt = Callable[[], bool]


@dataclass
class ChunkState:
    """One chunk (`max_batch_size` rows) of a generation, between two decode steps."""
    prompts: Batch              # the chunk's rows (prompt_ids, prompt_mask, per-sample fields)
    tokens: torch.Tensor        # [b, max_new_tokens] long, pad-filled beyond `steps` / after done
    logprobs: torch.Tensor      # [b, max_new_tokens] float32, the sampling version's log-probs
    versions: torch.Tensor      # [b, max_new_tokens] long, the sampling policy version, -1 unfilled
    done: torch.Tensor          # [b] bool: the row hit EOS / a stop string
    lengths: torch.Tensor       # [b] long: response tokens so far
    steps: int = 0              # decode positions filled (every unfinished row has `steps` tokens)

    @classmethod
    def empty(cls, prompts: Batch, max_new_tokens: int, pad_id: int) -> "ChunkState":
        b = len(prompts)
        return cls(prompts, torch.full((b, max_new_tokens), pad_id, dtype=torch.long),
                   torch.zeros(b, max_new_tokens), torch.full((b, max_new_tokens), -1, dtype=torch.long),
                   torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.long))


@dataclass
class PartialRollout:
    """A stopped generation: finished chunks, the chunk in flight, chunks not yet started."""
    sampling: SamplingParams
    generator_state: torch.Tensor                          # torch.Generator.get_state() at the stop
    finished: list[Batch] = field(default_factory=list)    # finished chunks' output rows
    current: ChunkState | None = None
    pending: list[Batch] = field(default_factory=list)     # expanded prompt rows, not started

    @property
    def rows(self) -> int:
        cur = len(self.current.prompts) if self.current is not None else 0
        return sum(len(b) for b in self.finished) + cur + sum(len(b) for b in self.pending)

    @property
    def unfinished_rows(self) -> int:
        cur = int((~self.current.done).sum()) if self.current is not None else 0
        return cur + sum(len(b) for b in self.pending)


class StopRule:
    """`budget` decode steps (tokens per row) in this call and/or an agreed `interrupt`."""

    def __init__(self, budget: int | None, interrupt: Interrupt | None, agree: Callable[[bool], bool]):
        if budget is not None and budget < 1:
            raise ValueError(f"native engine: budget must be >= 1 decode step (or None), got {budget}")
        self.budget, self.interrupt, self.agree = budget, interrupt, agree
        self.steps = 0

    @property
    def active(self) -> bool:
        return self.budget is not None or self.interrupt is not None

    def stop(self) -> bool:
        """Asked between decode steps, after at least one step of this call."""
        if not self.active or self.steps == 0:
            return False
        want = self.budget is not None and self.steps >= self.budget
        if self.interrupt is not None:
            want = self.agree(bool(self.interrupt()) or want)
        return want


def oldest_policy_version(batch: Batch) -> torch.Tensor:
    """[B] long: each row's oldest token version (its staleness is current - this); -1 if no tokens.
    Only generated tokens count (`response_attention_mask`): a `Batch.concat` pads with 0."""
    v = batch["policy_version"]
    attn = batch.get("response_attention_mask")
    valid = (v >= 0) & ((attn > 0) if attn is not None else (batch["response_mask"] > 0))
    big = torch.iinfo(v.dtype).max
    oldest = torch.where(valid, v, torch.full_like(v, big)).min(-1).values
    return torch.where(valid.any(-1), oldest, torch.full_like(oldest, -1))
