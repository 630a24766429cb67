"""The rollout ranks' loop: a native engine on its own copy of `model.path` (TP over the rollout
ranks), serving the trainer's commands from the bridge until it says stop.

Commands arrive by broadcast from bridge rank 0 (trainer rank 0), so every rollout rank runs the
same engine calls; bridge rank 1 (rollout rank 0) sends the results back. Weights arrive as
`BroadcastTransport` buckets (full HF-named tensors from any trainer TP/PP/VPP layout) and go
through `NativeTransport` into the engine's own loader, which keeps this rank's TP shard.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from megatron_rl.async_rl.messages import GenerateCmd, GenResult, StopCmd, WeightsCmd
from megatron_rl.rollout.weight_sync import NativeTransport, receive_broadcast


def tag_policy_version(batch, version: int) -> None:
    """Every sample and every response token carries the version that generated it."""
    for s in batch.samples:
        s["policy_version"] = version
    if "policy_version" not in batch:       # an engine with partial rollouts sets its own per-token tags
        batch["policy_version"] = torch.full(batch["response_ids"].shape, version, dtype=torch.long)


def chunk_sampling(sp, j: int):
    """Engine call j of a request draws with its own seed (call 0 keeps the request's)."""
    return sp if j == 0 or sp.seed is None else dataclasses.replace(sp, seed=sp.seed + 7919 * j)


class RolloutWorker:
    def __init__(self, engine, bridge):
        self.engine, self.bridge = engine, bridge
        self.version = 0

    def serve(self) -> None:
        idle_from = time.perf_counter()
        while True:
            cmd = self.bridge.broadcast_obj(None, 0)
            idle = time.perf_counter() - idle_from
            if isinstance(cmd, StopCmd):
                return
            if isinstance(cmd, WeightsCmd):
                self.receive_weights(cmd.version)
            elif isinstance(cmd, GenerateCmd):
                self.generate(cmd, idle)
            else:
                raise TypeError(f"rollout worker: unknown command {type(cmd).__name__}")
            idle_from = time.perf_counter()

    def receive_weights(self, version: int) -> None:
        transport = NativeTransport(self.engine)
        transport.begin()
        receive_broadcast(self.bridge, transport.send, src=0)
        transport.end()
        self.version = version
        if hasattr(self.engine, "policy_version"):     # the native engine tags its tokens with it
            self.engine.policy_version = version

    def generate(self, cmd: GenerateCmd, idle: float) -> None:
        size = cmd.chunk_prompts or len(cmd.prompts)
        parts = cmd.prompts.split(size)
        for j, part in enumerate(parts):
            t0 = time.perf_counter()
            out = self.engine.generate(part, chunk_sampling(cmd.sampling, j))
            tag_policy_version(out, self.version)
            result = GenResult(cmd.request_id, j, len(parts), out, self.version, time.perf_counter() - t0,
                               idle if j == 0 else 0.0)
            if self.bridge.rank == 1:
                self.bridge.send_obj(result, dst=0)


def run_rollout_rank(cfg, placement) -> None:
    """Build this rollout rank's engine (Megatron TP = rollout.num_ranks) and serve."""
    import transformers

    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.trainer.bootstrap import set_seed
    from megatron_rl.trainer.build import load_trunk

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    init_distributed(tp=placement.num_rollout, pp=1, seed=cfg.trainer.seed)
    set_seed(cfg.trainer.seed, cfg.trainer.deterministic)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    chunks = load_trunk(cfg, cfg.model.path, trainable=False)
    RolloutWorker(NativeEngine(chunks, tokenizer), placement.bridge).serve()
