"""CUDA-graph-compatible additive steering inside vLLM (`rollout.vllm.enforce_eager: false`).

Forward hooks registered after `vllm.LLM()` starts are invisible to its compiled model
and to the CUDA graphs captured at start-up. This mode builds the steering add into
the model instead: vLLM loads `MrlSteeredLlamaForCausalLM` (steering/vllm_graph_model.py,
a LlamaForCausalLM whose chosen decoder layers end with `hidden + window * delta`), and
only persistent buffers change afterwards, in place, so captured graphs stay valid:

- a slot table per request slot (vLLM's request-state index): `delta [R+1, H]` and the
  position window `[lo, hi)` that implements the scope (generated tokens sit at
  positions >= the request's prompt length);
- `token_slot [max_tokens]`: the slot of every token of the scheduled batch.

Per-request steering in one vLLM call: vLLM's model runner asks the model for its
`ModelState`; ours (`SteeringModelState`) writes a new request's row from its
`SamplingParams.extra_args["mrl_steering"]` and maps tokens to slots every step. Without
per-request specs every row holds the state of the last `set_state` (one call per group).

Additive modes only (`add`, `global`: the change does not depend on the hidden state).
Clamp modes encode every token through the SAE and stay on the eager hook path.
This module imports without vLLM; only vllm_graph_model.py needs it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_rl.steering.vllm_hooks import ADDITIVE, VLLMSteeringHook

STEERED_ARCH = "MrlSteeredLlamaForCausalLM"
MODEL_CLASS = "megatron_rl.steering.vllm_graph_model:SteeredLlamaForCausalLM"
LAYERS_KEY = "mrl_steering_layers"      # hf_config attribute (through hf_overrides): which layers carry buffers
BASE_ARCHS = ("LlamaForCausalLM",)
NO_LIMIT = 2 ** 62


EXTRA_KEY = "mrl_steering"              # SamplingParams.extra_args key: {"strengths": [F] | None, "enabled": bool}


class SteeredOutput:
    """Mixin for a vLLM decoder layer (`forward(positions, hidden, residual) -> (hidden,
    residual)`): persistent steering buffers and the graph-safe add."""

    def init_steering(self, hidden_size: int, max_reqs: int, max_tokens: int) -> None:
        # Created under vLLM's model-init device/dtype context: the model's device and dtype.
        # Row `max_reqs` is spare (padding); every row starts unsteered.
        self.register_buffer("mrl_delta", torch.zeros(max_reqs + 1, hidden_size), persistent=False)
        self.register_buffer("mrl_lo", torch.zeros(max_reqs + 1, dtype=torch.long), persistent=False)
        self.register_buffer("mrl_hi", torch.full((max_reqs + 1,), NO_LIMIT, dtype=torch.long), persistent=False)
        self.register_buffer("mrl_token_slot", torch.zeros(max_tokens, dtype=torch.long), persistent=False)

    def steer_output(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        p = positions.reshape(-1)
        slot = self.mrl_token_slot[: hidden.shape[0]]
        inside = (p >= self.mrl_lo[slot]) & (p < self.mrl_hi[slot])
        return hidden + inside.to(hidden.dtype)[:, None] * self.mrl_delta[slot].to(hidden.dtype)


def fill_token_slots(layer, idx_mapping: torch.Tensor, query_start_loc: torch.Tensor, num_reqs: int,
                     num_tokens: int) -> None:
    """Token t of batch request b gets slot `idx_mapping[b]` (no host sync: output_size given).
    Every later position (CUDA-graph padding) gets the spare row, zeroed here: after a level-2
    sleep the buffers hold garbage, and an out-of-range slot would fault the gather."""
    counts = query_start_loc[1:num_reqs + 1] - query_start_loc[:num_reqs]
    slots = torch.repeat_interleave(idx_mapping[:num_reqs].long(), counts, output_size=num_tokens)
    spare = layer.mrl_delta.shape[0] - 1
    layer.mrl_token_slot[:num_tokens].copy_(slots)
    layer.mrl_token_slot[num_tokens:].fill_(spare)
    layer.mrl_delta[spare].zero_()


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
    """Worker-side state for the built-in add: the eager hook's `set_state` contract (it
    fills every slot row), plus `bind_request` for one request's own row."""

    def __init__(self, intervention, layer: int, scope: str = "all"):
        require_additive(intervention.name)
        super().__init__(intervention, layer, scope)
        self._module = None

    @property
    def per_request(self) -> bool:
        """True when vLLM's runner uses our ModelState (token slots are mapped every step)."""
        return bool(self._module is not None and getattr(self._module, "mrl_slots_live", False))

    def attach(self, model) -> "VLLMGraphSteering":
        from megatron_rl.steering.vllm_hooks import ATTR

        module = self.target_layer(model)
        if module is None:
            return self
        if not hasattr(module, "mrl_delta"):
            raise RuntimeError(f"vLLM layer {self.layer} has no steering buffers: start vLLM with "
                               f"hf_overrides=graph_overrides(model_path, {self.layer}) (VLLMEngine.from_config does "
                               f"this when steering is on and rollout.vllm.enforce_eager=false)")
        self._module = module
        module.mrl_steering = self
        setattr(model, ATTR, self)
        return self

    def detach(self) -> None:
        if self._module is not None:
            self._module.mrl_delta.zero_()
            self._module.mrl_steering = None
            self._module = None

    def set_state(self, strengths=None, prompt_len: int | None = None, enabled: bool = True) -> None:
        super().set_state(strengths, prompt_len, enabled)
        if self._module is not None:
            self._write(slice(None), self._delta if enabled else None, position_window(self.scope, prompt_len))

    def bind_request(self, slot: int, spec: dict | None, prompt_len: int) -> None:
        """A new request at slot `slot`: its own strengths (spec from extra_args) or, without a
        spec, the current `set_state` strengths; its own prompt length sets the window."""
        if self._module is None:
            return
        enabled = self.enabled if spec is None else bool(spec.get("enabled", True))
        delta = None
        if enabled:
            given = None if spec is None else spec.get("strengths")
            delta = self._delta if given is None and spec is None else self.delta_for(self.strengths_row(given))
        self._write(slot, delta, position_window(self.scope, prompt_len))

    def _write(self, rows, delta: torch.Tensor | None, window: tuple[int, int]) -> None:
        m = self._module
        if delta is None:
            m.mrl_delta[rows] = 0
        else:
            m.mrl_delta[rows] = delta.to(m.mrl_delta)
        m.mrl_lo[rows] = window[0]
        m.mrl_hi[rows] = window[1]


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
