"""CPU compatibility shims for Megatron-Core 0.16.1 (the only place we patch it).

Megatron-Core assumes CUDA in a handful of spots that are harmless to redirect to
the CPU. Every shim here is installed only when `torch.cuda.is_available()` is
False, is idempotent, and says which Megatron code needs it. On a GPU machine this
module does nothing.
"""
from __future__ import annotations

import contextlib
import types

import torch

_INSTALLED = False


class _CpuTorchProxy(types.ModuleType):
    """A stand-in for the `torch` module seen by schedules.py: `device="cuda"` -> cpu.

    megatron/core/pipeline_parallel/schedules.py (0.16.1) calls
    `torch.zeros([], dtype=torch.int, device="cuda")` for token counting.
    """

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "cpu")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def install_cpu_shims() -> bool:
    """Install the shims if CUDA is absent; returns True when they are active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True

    # 1. torch.cuda.current_device(): used as a `device=` argument in RoPE
    #    (models/common/embeddings/rotary_pos_embedding.py), attention
    #    (transformer/attention.py) and p2p communication buffers. "cpu" is a valid
    #    device argument everywhere these calls land.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    # 2. torch.cuda.synchronize(): pipeline_parallel/p2p_communication.py calls it
    #    after batched isend/irecv; gloo ops are synchronous once waited on.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    # 3. The CUDA RNG tracker: attention dropout runs under
    #    `get_cuda_rng_tracker().fork()` (transformer/attention.py) and
    #    `model_parallel_cuda_manual_seed` stores CUDA RNG states. On CPU we use the
    #    default CPU generator (dropout is 0 in our models anyway).
    from megatron.core.tensor_parallel import random as mrandom

    class _CpuRngTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):  # noqa: D401 - keep seeds only
            self.seeds_.add(seed)
            self.states_[name] = torch.get_rng_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            yield

        def get_states(self):
            return {}

        def set_states(self, states):
            pass

    mrandom._CUDA_RNG_STATE_TRACKER = _CpuRngTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    if hasattr(mrandom, "initialize_rng_tracker"):
        mrandom.initialize_rng_tracker = lambda *a, **k: None

    # 4. schedules.py's `torch.zeros(..., device="cuda")` (see _CpuTorchProxy).
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuTorchProxy()

    # 5. transformer/utils.py `get_default_causal_mask` builds its mask with
    #    device="cuda"; fusions/fused_softmax.py imported it by name.
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=32)
    def _cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    tutils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    # 6. LanguageModule.setup_embeddings_and_output_layer (tied embeddings under PP)
    #    moves the shared weight with `weight.data.cuda()` before all-reducing it
    #    between the first and last stage; keep it on the CPU for that call only.
    from megatron.core.models.common.language_module import language_module as lm

    orig_setup = lm.LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self, *a, **k):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *aa, **kk: t  # type: ignore[assignment]
        try:
            return orig_setup(self, *a, **k)
        finally:
            torch.Tensor.cuda = cuda  # type: ignore[assignment]

    lm.LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu

    _INSTALLED = True
    return True
