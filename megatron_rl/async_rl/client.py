"""Trainer rank 0's side of the bridge: one thread owns it, so the trainer never blocks on a
send while it trains; the main thread queues commands and waits for results.

Operations run in submission order (one_step_off, sync: deterministic versions), except that
with `weights_first` (fully_async) a queued weight push goes before queued generate requests:
the rollout ranks pick up new weights at their next engine call. A request's results (one per
engine call) are collected before the next operation is sent, since the rollout ranks execute
one command at a time, with one exception: under `trainer.async.partial_rollout` the rollout
ranks may answer a generate request with a `PushRequest` (they stopped between two decode steps
because a push was signalled, `BridgeComm.signal_push`); the thread then sends the oldest queued
weight push right away and goes on collecting the request's results.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from megatron_rl.async_rl.messages import GenerateCmd, GenResult, PushRequest, StopCmd, WeightsCmd
from megatron_rl.rollout.weight_sync import BroadcastTransport


class RolloutClient:
    def __init__(self, bridge, *, weights_first: bool = False):
        self.bridge, self.weights_first = bridge, weights_first
        self._ops: deque = deque()
        self._cv = threading.Condition()
        self._results: list[GenResult] = []      # arrived, not yet taken (in arrival order)
        self._error: BaseException | None = None
        self.last_push_s = 0.0                   # seconds the last weight broadcast took
        self._thread = threading.Thread(target=self._run, name="rollout-client", daemon=True)
        self._thread.start()

    # --- main thread ------------------------------------------------------------------
    def submit(self, cmd: GenerateCmd) -> None:
        self._put(cmd)

    def push_weights(self, version: int, buckets: list) -> None:
        self._put((WeightsCmd(version), buckets))
        self.bridge.signal_push()       # after queueing: a rollout rank that sees it finds the push queued

    def next_result(self, request_ids) -> GenResult:
        """The oldest arrived result of one of `request_ids`; blocks until there is one."""
        with self._cv:
            while True:
                for i, r in enumerate(self._results):
                    if r.request_id in request_ids:
                        return self._results.pop(i)
                self._raise()
                self._cv.wait()

    def wait_idle(self) -> None:
        """Until every queued operation has been sent and answered."""
        with self._cv:
            while (self._ops or self._busy) and self._error is None:
                self._cv.wait()
            self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._put(StopCmd())
            self._thread.join(timeout=600)

    # --- the bridge thread --------------------------------------------------------------
    _busy = False

    def _put(self, op) -> None:
        with self._cv:
            self._raise()
            self._ops.append(op)
            self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"rollout client thread failed: {self._error!r}") from self._error

    def _take_op(self):
        with self._cv:
            while not self._ops:
                self._cv.wait()
            if self.weights_first:
                push = self._take_push()
                if push is not None:
                    self._busy = True
                    return push
            self._busy = True
            return self._ops.popleft()

    def _take_push(self):
        """The oldest queued weight push, removed from the queue (None if there is none)."""
        for i, op in enumerate(self._ops):
            if isinstance(op, tuple):
                del self._ops[i]
                return op
        return None

    def _run(self) -> None:
        try:
            while True:
                op = self._take_op()
                if isinstance(op, StopCmd):
                    self.bridge.broadcast_obj(op, 0)
                    return
                if isinstance(op, tuple):
                    self._push(*op)
                else:
                    self.bridge.broadcast_obj(op, 0)
                    chunks = 1
                    got = 0
                    while got < chunks:
                        res: GenResult | PushRequest = self.bridge.recv_obj(src=1)
                        if isinstance(res, PushRequest):
                            self._push_requested(res)
                            continue
                        chunks, got = res.chunks, got + 1
                        with self._cv:
                            self._results.append(res)
                            self._cv.notify_all()
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        except BaseException as e:      # surfaced in the main thread's next call
            with self._cv:
                self._error, self._busy = e, False
                self._cv.notify_all()

    def _push_requested(self, req: PushRequest) -> None:
        with self._cv:
            push = self._take_push()
        if push is None:        # cannot happen: a push is signalled only once it is queued
            raise RuntimeError(f"rollout ranks asked for a weight push during request {req.request_id}, but none "
                               "is queued")
        self._push(*push)

    def _push(self, cmd: WeightsCmd, buckets: list) -> None:
        t0 = time.perf_counter()
        self.bridge.broadcast_obj(cmd, 0)
        transport = BroadcastTransport(self.bridge, src=0)
        transport.begin()
        for b in buckets:
            transport.send(b)
        transport.end()
        self.last_push_s = time.perf_counter() - t0
