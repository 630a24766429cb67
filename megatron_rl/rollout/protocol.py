"""The rollout engine protocol: every engine (native Megatron, vLLM) and every
wrapper (SAE steering, agent tool loop) speaks it, so wrappers compose.

`generate(batch, sampling)` takes a `Batch` with `prompt_ids`/`prompt_mask`
(left-padded) and returns a new `Batch` with `sampling.n` rows per prompt (rows of
one prompt adjacent, per-sample fields copied, `sample["group"]` set to the
prompt's uid) holding `prompt_ids`, `prompt_mask`, `response_ids` (right-padded
with the pad id), `response_mask` (float, 1 on generated tokens up to and
including EOS/stop) and `rollout_logprob` (log-probs of the sampled tokens under
the sampling distribution, after temperature). The native engine also tags each response
token with the `engine.policy_version` that sampled it (`policy_version` [B, R] long, -1 on
padding; partial rollouts, rollout/partial.py).

`update_weights(named_tensors)` takes an iterator of (HF name, tensor) pairs,
e.g. the actor's weights resharded to the full (TP=1) layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, runtime_checkable

import torch

from megatron_rl.data.batch import Batch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1            # -1: off
    n: int = 1                 # samples per prompt
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)   # stop strings (kept in the response)
    greedy: bool = False
    seed: int | None = None
    ignore_eos: bool = False   # EOS does not end a response (fixed-length rollouts); stop strings still do
    min_new_tokens: int = 0    # EOS and stop strings are suppressed before this many tokens
    logprobs: bool = True      # return `rollout_logprob` (vLLM computes them at a cost; the native engine always can)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, batch: Batch, sampling: SamplingParams) -> Batch: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...
