"""Registry of log-prob/entropy backends: ``"torch"`` (reference) and ``"triton"``.

A backend is a module-like object with ``partials(logits, labels_local,
inv_temp)`` and ``backward(logits, labels_local, inv_temp, logz, entropy,
grad_logprob, grad_entropy, out)`` (contracts in ``reference.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch

_LOADERS: dict[str, Callable[[], object]] = {}


def register_backend(name: str):
    def deco(loader):
        _LOADERS[name] = loader
        return loader
    return deco


@register_backend("torch")
def _torch_backend():
    return importlib.import_module("megatron_rl.kernels.reference")


@register_backend("triton")
def _triton_backend():
    return importlib.import_module("megatron_rl.kernels.triton_logprob")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def get_backend(name: str | None, logits: torch.Tensor):
    """``name=None`` picks Triton for CUDA tensors when Triton is installed, else torch.

    float64 logits always use the torch path (the kernels compute in float32).
    """
    if name is None:
        use_triton = logits.is_cuda and triton_available() and logits.dtype != torch.float64
        name = "triton" if use_triton else "torch"
    if name not in _LOADERS:
        raise ValueError(f"megatron_rl.kernels: unknown backend {name!r}; expected one of {sorted(_LOADERS)}")
    return _LOADERS[name]()
