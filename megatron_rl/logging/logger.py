"""`MetricsLogger`: one `log(metrics, step)` call fans out to the configured sinks.

    logger = MetricsLogger(cfg.logging, total_steps=cfg.trainer.total_steps, start_step=resumed_step)
    with logger.timer("rollout"):
        batch = engine.generate(batch, sampling)
    logger.log({"reward/mean": ..., "actor/pg_loss": loss}, step)   # timing/rollout rides along
    # on a GPU also perf/gpu_mem_peak_gib/rollout (peak allocated memory inside the timer)

Every rank may call it (SPMD); only rank 0 creates sinks and writes. Tensor and
numpy scalars are converted to floats; non-numeric values are dropped with a warning once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator

from megatron_rl.logging.config import LoggingConfig
from megatron_rl.logging.sinks import SINKS, Sink

log = logging.getLogger(__name__)


def _rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


class CudaMemoryProbe:
    """Peak allocated GPU memory of a block: `torch.cuda.reset_peak_memory_stats` at its start,
    `max_memory_allocated` at its end (two cheap allocator-counter calls, no sync)."""

    def reset(self) -> None:
        import torch
        torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        import torch
        return torch.cuda.max_memory_allocated() / 2**30


def default_memory_probe() -> CudaMemoryProbe | None:
    """A CUDA probe when this process uses a GPU, else None (nothing logged on CPU)."""
    import sys
    torch = sys.modules.get("torch")            # a run without torch loaded has no GPU state to read
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return CudaMemoryProbe()


@contextlib.contextmanager
def timer(name: str, into: dict[str, float], memory=None) -> Iterator[None]:
    """Add the seconds spent in the block to `into["timing/<name>"]` (repeats accumulate); with a
    `memory` probe also its peak as `perf/gpu_mem_peak_gib/<name>` (max over repeats)."""
    if memory is not None:
        memory.reset()
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"timing/{name}"
        into[key] = into.get(key, 0.0) + time.perf_counter() - start
        if memory is not None:
            mkey = f"perf/gpu_mem_peak_gib/{name}"
            into[mkey] = max(into.get(mkey, 0.0), memory.peak_gib())


def to_float(value: Any) -> float | None:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, total_steps: int | None = None, start_step: int = 0,
                 rank: int | None = None, run_config: dict[str, Any] | None = None):
        self.cfg = cfg
        self.rank = _rank() if rank is None else rank
        self.timings: dict[str, float] = {}
        self.memory_probe = None        # CudaMemoryProbe once CUDA is in use (default_memory_probe)
        self._dropped: set[str] = set()
        self.sinks: list[Sink] = []
        if self.rank != 0:
            return
        for name in cfg.sinks:
            if name not in SINKS:
                raise ValueError(f"unknown logging sink '{name}'; valid: {sorted(SINKS)}")
            self.sinks.append(SINKS[name](cfg, total_steps=total_steps, start_step=start_step,
                                          run_config=run_config))

    def timer(self, name: str):
        """Time a phase; the result is logged as `timing/<name>` with the next `log`, and on a
        GPU its peak allocated memory as `perf/gpu_mem_peak_gib/<name>`."""
        if self.memory_probe is None:
            self.memory_probe = default_memory_probe()
        return timer(name, self.timings, self.memory_probe)

    def log(self, metrics: dict[str, Any], step: int) -> dict[str, float]:
        """Write one step's metrics (plus the timings gathered since the last call);
        returns what was written."""
        clean: dict[str, float] = {}
        for key, value in {**metrics, **self.timings}.items():
            number = to_float(value)
            if number is None:
                if key not in self._dropped:
                    log.warning("metric '%s' is a %s, not a number; not logged", key, type(value).__name__)
                    self._dropped.add(key)
                continue
            clean[key] = number
        self.timings = {}
        for sink in self.sinks:
            sink.log(clean, step)
        return clean

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
