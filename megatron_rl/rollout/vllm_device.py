"""Device-side steps around a colocated vLLM call (no vLLM import; no-ops without CUDA).

`release_torch_cache`: vLLM maps its weights and KV cache through its own cumem allocator,
outside torch's caching allocator, so blocks the update freed but torch still holds are
memory vLLM cannot have. The offloader empties the cache when it runs; with
`actor.offload_during_rollout=none` nothing did, and `actor.max_tokens_per_microbatch=20480`
then hit a CUDA OOM in vLLM's wake (H200, docs/BENCHMARKS.md). The engine calls this before
every wake.

`seeded_device_generator`: without per-request seeds vLLM samples from the device's default
generator, which an in-process engine shares with the trainer (vLLM seeds it once at start-up,
the trainer draws from it afterwards, differently on each rank). Seeding it per generate makes
the draw depend only on the step's seed and the batch, so the ranks of one vLLM TP group, and
the PP stages of one DP rank, sample the same tokens; the trainer's state is restored after.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_GIB = 2 ** 30


def release_torch_cache() -> dict[str, float]:
    """Empty torch's cache; `perf/torch_reserved_gib` (before) and `perf/torch_released_gib`."""
    if not torch.cuda.is_available():
        return {}
    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    return {"perf/torch_reserved_gib": before / _GIB,
            "perf/torch_released_gib": (before - torch.cuda.memory_reserved()) / _GIB}


def generate_seed(step_seed: int | None, engine_seed: int, dp_rank: int) -> int | None:
    """One seed per (step, rollout.vllm.seed, trainer DP rank): DP ranks draw different noise,
    the ranks of one DP rank the same. None (no step seed): leave the generator alone."""
    if step_seed is None:
        return None
    return (int(step_seed) + 1_000_003 * int(engine_seed) + 7_919 * int(dp_rank)) % 2 ** 63


@contextmanager
def seeded_device_generator(seed: int | None) -> Iterator[None]:
    """The current CUDA device's default generator seeded with `seed` inside, restored after."""
    if seed is None or not torch.cuda.is_available():
        yield
        return
    device = torch.cuda.current_device()
    state = torch.cuda.get_rng_state(device)
    torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        torch.cuda.set_rng_state(state, device)
