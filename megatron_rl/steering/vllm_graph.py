"""CUDA-graph-compatible additive steering inside vLLM (`rollout.vllm.enforce_eager: false`).

Forward hooks registered after `vllm.LLM()` starts are invisible to its compiled model
and to the CUDA graphs captured at start-up. This mode builds the steering add into
the model instead: vLLM loads `MrlSteeredLlamaForCausalLM` (steering/vllm_graph_model.py,
a LlamaForCausalLM whose chosen decoder layers end with `hidden + window(positions) *
delta`), and every generate call only rewrites persistent buffers in place: `delta [H]`
and the position window `[lo, hi)` that implements the scope. Captured graphs read the
same addresses, so they stay valid; disabled steering is a zero delta.

Additive modes only (`add`, `global`: the change does not depend on the hidden state).
Clamp modes encode every token through the SAE and stay on the eager hook path.
This module imports without vLLM; only vllm_graph_model.py needs it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_rl.steering.vllm_hooks import ADDITIVE, VLLMSteeringHook, decoder_layers

STEERED_ARCH = "MrlSteeredLlamaForCausalLM"
MODEL_CLASS = "megatron_rl.steering.vllm_graph_model:SteeredLlamaForCausalLM"
LAYERS_KEY = "mrl_steering_layers"      # hf_config attribute (through hf_overrides): which layers carry buffers
BASE_ARCHS = ("LlamaForCausalLM",)
NO_LIMIT = 2 ** 62


class SteeredOutput:
    """Mixin for a vLLM decoder layer (`forward(positions, hidden, residual) -> (hidden,
    residual)`): persistent steering buffers and the graph-safe add."""

    def init_steering(self, hidden_size: int) -> None:
        # Created under vLLM's model-init device/dtype context: the model's device and dtype.
        self.register_buffer("mrl_steer_delta", torch.zeros(hidden_size), persistent=False)
        self.register_buffer("mrl_steer_lo", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("mrl_steer_hi", torch.full((), NO_LIMIT, dtype=torch.long), persistent=False)

    def steer_output(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        p = positions.reshape(-1)
        inside = (p >= self.mrl_steer_lo) & (p < self.mrl_steer_hi)
        return hidden + inside.to(hidden.dtype)[:, None] * self.mrl_steer_delta.to(hidden.dtype)


def layer_index(prefix: str) -> int:
    """`model.layers.7` -> 7 (vLLM names each decoder layer by its prefix)."""
    return int(prefix.rsplit(".", 1)[-1])


def position_window(scope: str, prompt_len: int | None) -> tuple[int, int]:
    """Positions `[lo, hi)` that get the delta: generated tokens sit at positions >= prompt length."""
    if scope == "all":
        return 0, NO_LIMIT
    p = int(prompt_len or 0)
    return (p, NO_LIMIT) if scope == "generated" else (0, p)


class VLLMGraphSteering(VLLMSteeringHook):
    """Worker-side state for the built-in add: same `set_state` contract as the eager hook,
    but it writes the layer's buffers instead of registering a forward hook."""

    def __init__(self, intervention, layer: int, scope: str = "all"):
        require_additive(intervention.name)
        super().__init__(intervention, layer, scope)
        self._module = None

    def attach(self, model) -> "VLLMGraphSteering":
        from megatron_rl.steering.vllm_hooks import ATTR

        layers = decoder_layers(model)
        if not 0 <= self.layer < len(layers):
            raise ValueError(f"steering layer {self.layer} out of range for a vLLM model with {len(layers)} layers")
        module = layers[self.layer]
        if type(module).__name__ == "PPMissingLayer":
            return self
        if not hasattr(module, "mrl_steer_delta"):
            raise RuntimeError(f"vLLM layer {self.layer} has no steering buffers: start vLLM with "
                               f"hf_overrides=graph_overrides(model_path, {self.layer}) (VLLMEngine.from_config does "
                               f"this when steering is on and rollout.vllm.enforce_eager=false)")
        self._module = module
        setattr(model, ATTR, self)
        return self

    def detach(self) -> None:
        if self._module is not None:
            self._module.mrl_steer_delta.zero_()
            self._module = None

    def set_state(self, strengths=None, prompt_len: int | None = None, enabled: bool = True) -> None:
        super().set_state(strengths, prompt_len, enabled)
        if self._module is None:
            return
        m = self._module
        if enabled:
            m.mrl_steer_delta.copy_(self._delta)
        else:
            m.mrl_steer_delta.zero_()
        lo, hi = position_window(self.scope, prompt_len)
        m.mrl_steer_lo.fill_(lo)
        m.mrl_steer_hi.fill_(hi)


def require_additive(mode: str) -> None:
    if mode not in ADDITIVE:
        raise ValueError(f"steering.mode={mode!r} needs rollout.vllm.enforce_eager=true: only additive modes "
                         f"{ADDITIVE} run inside vLLM's CUDA graphs")


def graph_overrides(model_path: str | Path, layer: int, mode: str = "add") -> dict:
    """`hf_overrides` that make vLLM build the steered architecture with buffers on `layer`
    (checked before vLLM starts: the mode must be additive, the model a Llama)."""
    require_additive(mode)
    cfg_file = Path(model_path) / "config.json"
    try:
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file}: cannot read the model's architectures for graph-mode steering ({e})") from None
    if not set(archs) & set(BASE_ARCHS):
        raise ValueError(f"{cfg_file}: architectures={archs}; CUDA-graph steering supports {BASE_ARCHS}. "
                         f"Use rollout.vllm.enforce_eager=true (forward hooks) for other models")
    return {"architectures": [STEERED_ARCH], LAYERS_KEY: [int(layer)]}


def register_steered_arch() -> None:
    """Register the steered architecture with vLLM in this process (vLLM worker processes get
    it from the `vllm.general_plugins` entry point in pyproject.toml)."""
    from vllm import ModelRegistry

    if STEERED_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(STEERED_ARCH, MODEL_CLASS)
