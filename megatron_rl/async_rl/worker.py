"""The rollout ranks' loop: a native engine on its own copy of `model.path` (TP over the rollout
ranks), serving the trainer's commands from the bridge until it says stop.

Commands arrive by broadcast from bridge rank 0 (trainer rank 0), so every rollout rank runs the
same engine calls; bridge rank 1 (rollout rank 0) sends the results back. Weights arrive as
`BroadcastTransport` buckets (full HF-named tensors from any trainer TP/PP/VPP layout) and go
through `NativeTransport` into the engine's own loader, which keeps this rank's TP shard.

Partial rollouts (`trainer.async.partial_rollout`, a request's `partial` flag): the engine
polls, between decode steps, whether trainer rank 0 has queued a weight push that this rank has
not received (`BridgeComm.pushes_signalled`, read on rollout rank 0, agreed by the engine over its
model-parallel group). If so it stops (`PartialRollout`), rollout rank 0 answers with a
`PushRequest`, every rollout rank receives the push(es), sets `engine.policy_version`, and the
engine `resume`s under the new weights. Every token keeps the version that sampled it; a
sample's `policy_version` record is its oldest token's, so its staleness is current - oldest.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from megatron_rl.async_rl.messages import GenerateCmd, GenResult, PushRequest, StopCmd, WeightsCmd
from megatron_rl.rollout.partial import PartialRollout, oldest_policy_version
from megatron_rl.rollout.weight_sync import NativeTransport, receive_broadcast


def tag_policy_version(batch, version: int) -> None:
    """Every response token carries the version that sampled it (the native engine tags its own;
    otherwise `version`), every sample its oldest token's version (`version` if it has none)."""
    if "policy_version" not in batch:
        batch["policy_version"] = torch.full(batch["response_ids"].shape, version, dtype=torch.long)
    for s, oldest in zip(batch.samples, oldest_policy_version(batch).tolist()):
        s["policy_version"] = oldest if oldest >= 0 else version


def chunk_sampling(sp, j: int):
    """Engine call j of a request draws with its own seed (call 0 keeps the request's)."""
    return sp if j == 0 or sp.seed is None else dataclasses.replace(sp, seed=sp.seed + 7919 * j)


class RolloutWorker:
    def __init__(self, engine, bridge):
        self.engine, self.bridge = engine, bridge
        self.version = 0
        self.pushes_received = 0

    def serve(self) -> None:
        idle_from = time.perf_counter()
        while True:
            cmd = self.bridge.broadcast_obj(None, 0)
            idle = time.perf_counter() - idle_from
            if isinstance(cmd, StopCmd):
                return
            if isinstance(cmd, WeightsCmd):
                self.receive_weights(cmd)
            elif isinstance(cmd, GenerateCmd):
                self.generate(cmd, idle)
            else:
                raise TypeError(f"rollout worker: unknown command {type(cmd).__name__}")
            idle_from = time.perf_counter()

    def receive_weights(self, cmd: WeightsCmd) -> None:
        transport = NativeTransport(self.engine)
        transport.begin()
        receive_broadcast(self.bridge, transport.send, src=0)
        transport.end()
        self.version = cmd.version
        self.pushes_received += 1
        if hasattr(self.engine, "policy_version"):     # the native engine tags its tokens with it
            self.engine.policy_version = cmd.version

    def generate(self, cmd: GenerateCmd, idle: float) -> None:
        size = cmd.chunk_prompts or len(cmd.prompts)
        parts = cmd.prompts.split(size)
        kw = {"interrupt": self.push_waiting} if cmd.partial else {}
        for j, part in enumerate(parts):
            t0, push_s, interrupts = time.perf_counter(), 0.0, 0
            sp = chunk_sampling(cmd.sampling, j)
            if cmd.partial:
                push_s += self.take_pushes(cmd.request_id)      # a new engine call starts on the newest weights
            out = self.engine.generate(part, sp, **kw)
            while isinstance(out, PartialRollout):
                interrupts += 1
                push_s += self.take_pushes(cmd.request_id)
                out = self.engine.resume(out, sp, **kw)
            tag_policy_version(out, self.version)
            result = GenResult(cmd.request_id, j, len(parts), out, self.version,
                               time.perf_counter() - t0 - push_s, idle if j == 0 else 0.0, interrupts)
            if self.bridge.rank == 1:
                self.bridge.send_obj(result, dst=0)

    # --- partial rollouts ---------------------------------------------------------------
    def push_waiting(self) -> bool:
        """The engine's interrupt: a queued push not received yet (asked on rollout rank 0 only;
        the engine's all-reduce makes the other ranks stop with it)."""
        return self.bridge.rank == 1 and self.bridge.pushes_signalled() > self.pushes_received

    def take_pushes(self, request_id: int) -> float:
        """Receive every push queued so far (all rollout ranks take the same number); seconds spent."""
        t0 = time.perf_counter()
        waiting = max(0, self.bridge.pushes_signalled() - self.pushes_received) if self.bridge.rank == 1 else 0
        n = torch.tensor([waiting],
                         device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        if dist.is_initialized() and dist.get_world_size() > 1:        # the rollout ranks' own world
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
        for _ in range(int(n.item())):
            if self.bridge.rank == 1:
                self.bridge.send_obj(PushRequest(request_id), dst=0)
            cmd = self.bridge.broadcast_obj(None, 0)
            if not isinstance(cmd, WeightsCmd):
                raise RuntimeError(f"rollout worker: asked for a weight push during request {request_id}, got "
                                   f"{type(cmd).__name__}")
            self.receive_weights(cmd)
        return time.perf_counter() - t0 if n.item() else 0.0


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
