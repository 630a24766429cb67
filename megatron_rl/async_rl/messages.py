"""What crosses the bridge between trainer rank 0 and the rollout ranks (tensors + JSON through
codec.py: a new message class joins its registry)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams


@dataclass
class GenerateCmd:
    request_id: int
    prompts: Batch              # the global prompt batch of one step (or of one validation call)
    sampling: SamplingParams
    chunk_prompts: int = 0      # prompts per engine call (0: all); each call's result is sent on its own


@dataclass
class WeightsCmd:
    version: int                # the broadcast buckets that follow are this policy version


@dataclass
class StopCmd:
    pass


@dataclass
class GenResult:
    request_id: int
    chunk: int                  # 0 .. chunks-1, in order
    chunks: int
    batch: Batch                # samples carry `policy_version`; tensor `policy_version` [B, R]
    version: int                # the engine's policy version while it generated this chunk
    generate_s: float           # engine time of this chunk
    idle_s: float               # rollout ranks' wait for a command before this chunk's request
