"""Device-side steps around a colocated vLLM call (no vLLM import; no-ops without CUDA).

`release_torch_cache`: vLLM maps its weights and KV cache through its own cumem allocator,
outside torch's caching allocator, so blocks the update freed but torch still holds are
memory vLLM cannot have. The offloader empties the cache when it runs; with
`actor.offload_during_rollout=none` nothing did, and `actor.max_tokens_per_microbatch=20480`
then hit a CUDA OOM in vLLM's wake (H200, docs/BENCHMARKS.md). The engine calls this before
every wake.

No device-generator seeding here: re-seeding the device's default generator around a generate
(`torch.cuda.manual_seed`) was measured not to make vLLM's draw repeat (H200, vLLM 0.26,
`tools/bench_e2e.py vllm`, 2026-12-01: `same_tokens` false for engine-seeded reps under one
device seed, true with request seeds), so reproducibility comes from per-request seeds
(`rollout.vllm.per_request_seed`).
"""
from __future__ import annotations

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
