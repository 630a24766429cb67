"""Transport into an engine object in this process that exposes `update_weights`
(the native engine, or any protocol engine): buckets are reassembled and the full
HF-named tensors streamed into `engine.update_weights` once, at `end()`.

The native engine's loader keeps fused parts (q/k/v, gate/up) until all have arrived,
possibly across buckets, so the receiver hands it copies rather than bucket views.
"""
from __future__ import annotations

import queue
import threading

from megatron_rl.rollout.weight_sync.base import register_transport
from megatron_rl.rollout.weight_sync.bucketing import Bucket, BucketReceiver

_DONE = object()


@register_transport("native")
class NativeTransport:
    def __init__(self, engine):
        self.engine = engine
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def begin(self) -> None:
        # update_weights consumes one iterator; a thread lets buckets arrive one at a time.
        self._q, self._error = queue.Queue(maxsize=1), None
        self._rx = BucketReceiver(self._q.put, copy=True)
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _stream(self):
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            yield from item

    def _consume(self):
        try:
            self.engine.update_weights(self._stream())
        except BaseException as e:   # re-raised in end()
            self._error = e
            while self._q.get() is not _DONE:
                pass

    def send(self, bucket: Bucket) -> None:
        self._rx.add(bucket)

    def end(self) -> None:
        self._q.put(_DONE)
        self._thread.join()
        self._rx.finish()
        if self._error is not None:
            raise self._error
