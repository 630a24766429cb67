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
    partial: bool = False       # trainer.async.partial_rollout: a queued weight push interrupts the engine


@dataclass
class WeightsCmd:
    version: int                # the broadcast buckets that follow are this policy version


@dataclass
class StopCmd:
    pass


@dataclass
class PushRequest:
    """Rollout rank 0 -> trainer rank 0, in place of a result: the engine stopped request
    `request_id` between two decode steps and every rollout rank waits for the oldest queued
    weight push (trainer.async.partial_rollout)."""
    request_id: int


@dataclass
class GenResult:
    request_id: int
    chunk: int                  # 0 .. chunks-1, in order
    chunks: int
    batch: Batch                # samples carry `policy_version`; tensor `policy_version` [B, R]
    version: int                # the engine's policy version when this chunk ended (its newest tokens')
    generate_s: float           # engine time of this chunk (weight pushes taken mid-generation excluded)
    idle_s: float               # rollout ranks' wait for a command before this chunk's request
    interrupts: int = 0         # weight pushes taken inside this chunk's generation (partial rollouts)
