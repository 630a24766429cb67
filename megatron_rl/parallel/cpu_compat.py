"""Compatibility shims for Megatron-Core 0.16.1 (the only place we patch or reset its state).

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
    """A stand-in for the `torch` module of a few Megatron modules: tensor factories
    called with `device="cuda"` make CPU tensors instead.

    Megatron-Core 0.16.1 does this in pipeline_parallel/schedules.py (token counts),
    optimizer/optimizer.py (loss-scale and found-inf scalars), optimizer/clip_grads.py
    (norm accumulators), distributed/param_and_grad_buffer.py (a warm-up tensor) and
    utils.py (the local multi-tensor L2 norm).
    """

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(kwargs):
        if str(kwargs.get("device", "cpu")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._cpu(kwargs))

    def ones(self, *args, **kwargs):
        return torch.ones(*args, **self._cpu(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._cpu(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._cpu(kwargs))


def install_no_te_fixes() -> None:
    """Fixes for Megatron-Core 0.16.1 without Transformer Engine, on CPU and GPU alike (two).

    transformer/moe/moe_utils.py imports `te_general_gemm` only when TE imports, yet
    `RouterGatingLinearFunction` (every MoE router's gating GEMM) tests
    `te_general_gemm is not None`: a NameError without TE. Define the name as None so
    the torch.mm path runs.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # transformer/multi_latent_attention.py (DeepSeek-V3) sets HAVE_TE from an import that succeeds without TE
    # (megatron's extensions module then exports MagicMock placeholders), so `isinstance(linear_proj, TELinear)`
    # raises TypeError; without TE there is no TELinear: mark it absent.
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.HAVE_TE and not isinstance(mla.TELinear, type):
        mla.HAVE_TE = False


def install_cpu_shims() -> bool:
    """Install the shims if CUDA is absent; returns True when they are active."""
    global _INSTALLED
    install_no_te_fixes()
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

    # Activation recomputation (tensor_parallel/random.py CheckpointFunction) saves and
    # restores the CUDA RNG state around the recomputed forward.
    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    mrandom._CUDA_RNG_STATE_TRACKER = _CpuRngTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    if hasattr(mrandom, "initialize_rng_tracker"):
        mrandom.initialize_rng_tracker = lambda *a, **k: None

    # 4. Tensor factories with device="cuda" (see _CpuTorchProxy).
    import importlib

    for mod in ("megatron.core.pipeline_parallel.schedules", "megatron.core.optimizer.optimizer",
                "megatron.core.optimizer.clip_grads", "megatron.core.distributed.param_and_grad_buffer",
                "megatron.core.utils"):
        importlib.import_module(mod).torch = _CpuTorchProxy()

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

    # 7. optimizer/clip_grads.py `clip_grad_by_total_norm_fp32` asserts
    #    `param.grad.type() == 'torch.cuda.FloatTensor'`; same math on CPU tensors.
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer

    def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for g in grads:
                g.mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu

    # 8. MoE (transformer/moe/): the alltoall token dispatcher creates a side stream
    #    (`torch.cuda.Stream()`) for its device-to-host copies of the split sizes and runs
    #    them under `torch.cuda.stream(...)`; moe_utils.py's aux-loss tracker allocates
    #    with device="cuda". On CPU streams are no-ops and the copies are plain tensors.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    token_dispatcher.torch = _CpuStreamsTorchProxy()
    moe_utils.torch = _CpuStreamsTorchProxy()
    #    `maybe_move_tensor_to_cpu(t, as_numpy=True)` converts only CUDA tensors, so on
    #    CPU the alltoall split sizes stay tensors, which `all_to_all_single` rejects.
    orig_to_cpu = moe_utils.maybe_move_tensor_to_cpu

    def to_cpu_numpy(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return orig_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu_numpy

    # 9. models/common/embeddings/rope_utils.py `get_pos_emb_on_this_cp_rank` (RoPE under
    #    context parallelism, padded sequences) builds its chunk index with pin_memory=True and
    #    `.cuda()`; rotary_pos_embedding.py imported it by name. Same slicing on the CPU.
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    def pos_emb_on_this_cp_rank_cpu(pos_emb, seq_dim, cp_group):
        cp_size, cp_rank = cp_group.size(), cp_group.rank()
        idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
        pos_emb = pos_emb.index_select(seq_dim, idx)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])

    rope_utils.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank_cpu
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank_cpu

    _INSTALLED = True
    return True


class _CpuStream:
    """A CUDA stream / event stand-in: every operation is already complete on CPU."""

    def wait_stream(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return self

    def synchronize(self):
        pass


_CPU_STREAM = _CpuStream()


class _CpuCudaStreams:
    """`torch.cuda` with Stream / current_stream / stream as no-ops (shim 8)."""

    Stream = staticmethod(lambda *a, **k: _CPU_STREAM)
    current_stream = staticmethod(lambda *a, **k: _CPU_STREAM)
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuStreamsTorchProxy(_CpuTorchProxy):
    cuda = _CpuCudaStreams()


def reset_moe_aux_loss_scale() -> None:
    """Megatron-Core's `MoEAuxLossAutoScaler` keeps the aux-loss backward scale as a class
    attribute: the first schedule run stores the very tensor it was given and later runs
    `copy_` into it, so a run whose scale has another shape (a 0-dim one from a
    `grad_scale_func`, another device) fails with "output with shape [] doesn't match the
    broadcast shape [1]". Every schedule sets the scale before its first forward, so clearing
    it first (on CPU and GPU) only drops the stale one."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
