"""Splitting one torchrun world into trainer ranks and rollout ranks (`rollout.placement:
disaggregated`), before anything initialises torch.distributed.

Megatron-Core 0.16.1's `initialize_model_parallel` carves its groups out of the default
world, so the trainer ranks must *be* the default world: each side calls
`init_process_group` with its own prefix of one rendezvous store (torchrun's agent store,
or a `TCPStore` hosted by global rank 0 when there is no agent), and a third group, the
bridge, joins trainer rank 0 (bridge rank 0) with the rollout ranks (bridge ranks 1..R) for
weights and samples. The bridge is a bare `ProcessGroupGloo` on the same store: it is never
registered with torch.distributed, so it is reached only through `BridgeComm`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rl.async_rl.codec import dumps as _dumps
from megatron_rl.async_rl.codec import loads as _loads

_ACTIVE: "Placement | None" = None


@dataclass
class Placement:
    role: str                   # trainer | rollout
    world_size: int             # the whole torchrun world
    num_trainers: int
    num_rollout: int
    global_rank: int
    bridge: "BridgeComm | None"     # trainer rank 0 and every rollout rank; None on other trainer ranks


def active_placement() -> Placement | None:
    """The split made by `split_world` in this process, or None (colocated)."""
    return _ACTIVE


class BridgeComm:
    """The comm adapter of `weight_sync.BroadcastTransport` (`broadcast_obj`, `broadcast`) plus
    point-to-point objects, on an unregistered process group; one thread at a time may use it.
    Objects travel as tensors + JSON (`codec.py`), never as pickles. `store` (a key-value store
    all bridge ranks share) carries the one signal that must not wait for the group: how many
    weight pushes trainer rank 0 has queued, which a generating engine polls between decode steps
    (`trainer.async.partial_rollout`)."""

    PUSHES = "pushes_queued"

    def __init__(self, pg, rank: int, size: int, store=None):
        self.pg, self.rank, self.size, self.store = pg, rank, size, store

    def signal_push(self) -> None:
        """Trainer rank 0: one more weight push is queued (call after queueing it)."""
        if self.store is not None:
            self.store.add(self.PUSHES, 1)

    def pushes_signalled(self) -> int:
        """Weight pushes queued so far (a store round-trip, non-blocking)."""
        return int(self.store.add(self.PUSHES, 0)) if self.store is not None else 0

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self.pg.broadcast([tensor], opts).wait()

    def broadcast_obj(self, obj, src: int):
        if self.rank == src:
            data = _dumps(obj)
            size = torch.tensor([data.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        self.broadcast(size, src)
        if self.rank != src:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.broadcast(data, src)
        return obj if self.rank == src else _loads(data)

    def send_obj(self, obj, dst: int, tag: int = 0) -> None:
        data = _dumps(obj)
        self.pg.send([torch.tensor([data.numel()], dtype=torch.long)], dst, tag).wait()
        self.pg.send([data], dst, tag).wait()

    def recv_obj(self, src: int, tag: int = 0):
        size = torch.zeros(1, dtype=torch.long)
        self.pg.recv([size], src, tag).wait()
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.pg.recv([data], src, tag).wait()
        return _loads(data)


def _store(rank: int, world: int, timeout: timedelta):
    """torchrun's agent store when it hosts one (`TORCHELASTIC_USE_AGENT_STORE`), else a TCPStore
    that global rank 0 hosts at MASTER_ADDR:MASTER_PORT; prefixed by the restart count."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(host, port, world, is_master=(rank == 0 and not agent), timeout=timeout,
                          wait_for_workers=False)
    return dist.PrefixStore(f"mrl/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def split_world(num_rollout: int, *, timeout_s: int = 1800) -> Placement:
    """Initialise this process's default world (trainer or rollout) and the bridge; idempotent.
    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun, tests/helpers.run_multiproc)."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if dist.is_initialized():
        raise RuntimeError("rollout.placement=disaggregated: torch.distributed is already initialised; the world "
                           "must be split before (call split_world first)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("rollout.placement=disaggregated needs a multi-process launch (torchrun: "
                           "bash launch/torchrun.sh --nproc N), MASTER_PORT is not set")
    trainers = world - num_rollout
    if num_rollout < 1 or trainers < 1:
        raise ValueError(f"rollout.num_ranks={num_rollout} in a world of {world}: need 1 <= rollout.num_ranks < "
                         f"world size (the first ranks train, the last rollout.num_ranks generate)")
    timeout = timedelta(seconds=timeout_s)
    store = _store(rank, world, timeout)
    on_gpu = torch.cuda.is_available()
    role = "trainer" if rank < trainers else "rollout"
    local, size = (rank, trainers) if role == "trainer" else (rank - trainers, num_rollout)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", store=dist.PrefixStore(role, store),
                            rank=local, world_size=size, timeout=timeout)
    bridge = None
    if rank == 0 or role == "rollout":
        b_rank = 0 if rank == 0 else rank - trainers + 1
        pg = dist.ProcessGroupGloo(dist.PrefixStore("bridge", store), b_rank, num_rollout + 1, timeout)
        bridge = BridgeComm(pg, b_rank, num_rollout + 1, store=dist.PrefixStore("bridge_signal", store))
    _ACTIVE = Placement(role=role, world_size=world, num_trainers=trainers, num_rollout=num_rollout,
                        global_rank=rank, bridge=bridge)
    global _STORE
    _STORE = store
    return _ACTIVE


_STORE = None


def leave_world(timeout_s: float = 600.0) -> None:
    """Tear the split down in an order that cannot abort a peer: every process destroys its
    groups, the others then check in on the store, and global rank 0 - which hosts the
    TCPStore - waits for all of them before it goes. A store host that exits first makes a
    peer's gloo teardown throw in a C++ thread (SIGABRT, exit -6: seen in CI)."""
    global _STORE, _ACTIVE
    if _ACTIVE is None or _STORE is None:
        return
    placement, store = _ACTIVE, _STORE
    placement.bridge = None          # drop the bridge group before the store can go
    if dist.is_initialized():
        dist.destroy_process_group()
    if placement.global_rank != 0:
        store.add("left", 1)
    else:
        deadline = time.monotonic() + timeout_s
        while store.add("left", 0) < placement.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    _STORE, _ACTIVE = None, None


def reset_placement() -> None:
    """Forget the split (tests that run several placements in one process)."""
    global _ACTIVE
    _ACTIVE = None
