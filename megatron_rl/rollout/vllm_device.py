"""Device-side steps around a colocated vLLM call (no vLLM import; no-ops without CUDA).

`release_torch_cache`: vLLM maps its weights and KV cache through its own cumem allocator,
outside torch's caching allocator, so blocks the update freed but torch still holds are
memory vLLM cannot have. The offloader empties the cache when it runs; with
`actor.offload_during_rollout=none` nothing did, and `actor.max_tokens_per_microbatch=20480`
then hit a CUDA OOM in vLLM's wake (H200, docs/BENCHMARKS.md). The engine calls this before
every wake. With `rollout.vllm.release_torch_cache: auto` (opt-in) the cache stays when what
vLLM's last sleep gave back (`wake_need`, measured) fits in the free memory with a margin:
emptying it costs the next update its allocator warm-up (cudaMalloc of every block again).

No device-generator seeding here: re-seeding the device's default generator around a generate
(`torch.cuda.manual_seed`) was measured not to make vLLM's draw repeat (H200, vLLM 0.26,
`tools/bench_e2e.py vllm`, 2026-12-01: `same_tokens` false for engine-seeded reps under one
device seed, true with request seeds), so reproducibility comes from per-request seeds
(`rollout.vllm.per_request_seed`).
"""
from __future__ import annotations

import torch

_GIB = 2 ** 30


RELEASE_POLICIES = ("auto", "always")
WAKE_MARGIN_GIB = 2.0          # on top of the measured wake need; also at least 3% of the device
WAKE_MARGIN_FRACTION = 0.03


def free_device_bytes() -> int | None:
    """Free memory of the current device as the driver sees it (None without CUDA)."""
    return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None


def keep_torch_cache(policy: str, free: int | None, wake_need: int | None, total: int | None) -> bool:
    """True when vLLM's wake (`wake_need` bytes, what its last sleep freed) fits in `free` with
    the margin, so torch's cached blocks can stay; `always`, or anything unknown, releases."""
    if policy == "always" or None in (free, wake_need, total):
        return False
    margin = max(WAKE_MARGIN_GIB * _GIB, WAKE_MARGIN_FRACTION * total)
    return free >= wake_need + margin


def release_torch_cache(policy: str = "always", wake_need: int | None = None) -> dict[str, float]:
    """Empty torch's cache unless `keep_torch_cache`; `perf/torch_reserved_gib` (before) and
    `perf/torch_released_gib` (0 when kept)."""
    if not torch.cuda.is_available():
        return {}
    before = torch.cuda.memory_reserved()
    free, total = (torch.cuda.mem_get_info() if policy != "always" else (None, None))
    if keep_torch_cache(policy, free, wake_need, total):
        return {"perf/torch_reserved_gib": before / _GIB, "perf/torch_released_gib": 0.0,
                "perf/torch_cache_kept": 1.0}
    torch.cuda.empty_cache()
    return {"perf/torch_reserved_gib": before / _GIB,
            "perf/torch_released_gib": (before - torch.cuda.memory_reserved()) / _GIB, "perf/torch_cache_kept": 0.0}
