"""SAE steering inside vLLM: the same `Intervention`s as the native engine, hooked on
every vLLM worker's decoder layer (all TP ranks, not only rank 0).

vLLM's Llama/Qwen2 decoder layers return `(hidden, residual)` with the full residual
stream equal to `hidden + residual` (the next layer's fused add-norm sums them). The
hook therefore computes the intervention on `hidden + residual` and adds the change
to `hidden` only. Hidden states are token-major `[T, H]` over all scheduled tokens.

Per-request strengths: vLLM batches requests freely, so one strength row and one
prompt length are active per `generate` call and `VLLMEngine` issues one call per
distinct (strength row[, prompt length]) group, setting them on every worker first
with `set_state` (through `llm.apply_model`). Scope `generated` / `prompt` compare each
token's position (the layer's `positions` input) with the group's prompt length: a
token at position >= P is a generated one, as in the native engine's decode steps.

Additive interventions (`add`, `global`) reduce to a constant `delta [H]` per group,
computed once in `set_state` and added in place to a persistent buffer: the hook is one
add, and the buffer stays valid under CUDA graphs (filled per call, not per step).
"""
from __future__ import annotations

import torch

from megatron_rl.steering.interventions import Intervention

ADDITIVE = ("add", "global")      # apply(h, s) - h does not depend on h
ATTR = "_mrl_steering"            # where the hook object lives on the vLLM model


def decoder_layers(model):
    """`model.model.layers` of a vLLM causal LM (clear error otherwise)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers; vLLM steering supports decoder-only "
                        f"models laid out like LlamaForCausalLM")
    return layers


class VLLMSteeringHook:
    """One per vLLM worker, attached to `model.model.layers[layer]`."""

    def __init__(self, intervention: Intervention, layer: int, scope: str = "all"):
        if scope not in ("all", "prompt", "generated"):
            raise ValueError(f"steering.scope={scope!r}; expected all|prompt|generated")
        self.intervention, self.layer, self.scope = intervention, int(layer), scope
        self.additive = intervention.name in ADDITIVE
        self.enabled = True
        self.prompt_len: int | None = None
        self._strengths = intervention.default_strengths()
        self._delta: torch.Tensor | None = None       # persistent [H] buffer (additive modes)
        self._handle = None

    def target_layer(self, model):
        """The decoder layer to steer on this worker, or None when another pipeline stage owns it."""
        layers = decoder_layers(model)
        if not 0 <= self.layer < len(layers):
            raise ValueError(f"steering layer {self.layer} out of range for a vLLM model with {len(layers)} layers")
        module = layers[self.layer]
        return None if type(module).__name__ == "PPMissingLayer" else module

    def attach(self, model) -> "VLLMSteeringHook":
        module = self.target_layer(model)
        if module is None:
            return self
        self.detach()
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)
        setattr(model, ATTR, self)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def strengths_row(self, strengths=None) -> torch.Tensor:
        """`[F]` strengths (None: config defaults), checked against the intervention."""
        s = self.intervention.default_strengths() if strengths is None else torch.as_tensor(strengths)
        s = s.reshape(-1)
        if s.numel() != self.intervention.n_strengths:
            raise ValueError(f"vLLM steering strengths must have {self.intervention.n_strengths} entries for mode "
                             f"{self.intervention.name!r}; got {s.numel()}")
        return s

    def delta_for(self, strengths: torch.Tensor) -> torch.Tensor:
        """Additive modes: the constant `[H]` change the intervention adds at these strengths."""
        sae = self.intervention.sae
        zero = torch.zeros(1, sae.d_in, dtype=sae.dtype, device=sae.W_dec.device)
        return self.intervention.apply(zero, strengths.to(zero)[None])[0]

    def set_state(self, strengths=None, prompt_len: int | None = None, enabled: bool = True) -> None:
        """Strengths `[F]` (None: config defaults) and prompt length for the next generate call."""
        s = self.strengths_row(strengths)
        if self.scope != "all" and prompt_len is None:
            raise ValueError(f"steering.scope={self.scope!r} needs the group's prompt length")
        self._strengths, self.prompt_len, self.enabled = s, prompt_len, enabled
        if self.additive:
            delta = self.delta_for(s)
            if self._delta is None or self._delta.shape != delta.shape:
                self._delta = delta.clone()
            else:
                self._delta.copy_(delta)

    def _mask(self, positions: torch.Tensor | None, n: int, device):
        if self.scope == "all":
            return None
        if positions is None or positions.shape[-1] != n:
            raise RuntimeError(f"vLLM steering scope {self.scope!r}: the hooked layer got no positions for its "
                               f"{n} tokens")
        gen = positions.reshape(-1) >= self.prompt_len
        return (gen if self.scope == "generated" else ~gen).to(device)

    def _hook(self, _module, args, kwargs, output):
        if not self.enabled:
            return output
        hidden, residual = output
        positions = kwargs.get("positions", args[0] if args else None)
        mask = self._mask(positions, hidden.shape[0], hidden.device)
        if self.additive:
            delta = self._delta.to(hidden.dtype)
            if mask is None:
                return hidden + delta, residual
            return hidden + mask[:, None].to(hidden.dtype) * delta, residual
        full = hidden + residual if residual is not None else hidden
        work = self.intervention.sae.dtype
        s = self._strengths.to(device=hidden.device, dtype=work)[None]
        change = (self.intervention.apply(full.to(work), s) - full.to(work)).to(hidden.dtype)
        if mask is not None:
            change = change * mask[:, None].to(change.dtype)
        return hidden + change, residual


def attach_vllm_steering(model, intervention: Intervention, layer: int, scope: str = "all",
                         graph: bool = False) -> VLLMSteeringHook:
    """Run on each vLLM worker (`llm.apply_model(lambda m: attach_vllm_steering(m, ...))`).
    graph=True: the model was built with steering buffers (steering/vllm_graph.py), no hook."""
    sae = intervention.sae
    device = next(model.parameters()).device
    if sae.W_dec.device != device:
        intervention.sae = sae.to(device)
        for k in ("idx", "max_act", "base_strengths"):
            setattr(intervention, k, getattr(intervention, k).to(device))
    if graph:
        from megatron_rl.steering.vllm_graph import VLLMGraphSteering

        hook = VLLMGraphSteering(intervention, layer, scope)
    else:
        hook = VLLMSteeringHook(intervention, layer, scope)
    hook.attach(model)
    hook.set_state(None, 0 if scope != "all" else None)
    return hook


def set_vllm_steering(model, strengths=None, prompt_len: int | None = None, enabled: bool = True) -> bool:
    """Worker side of `VLLMEngine`'s per-group call; False when this worker has no hook."""
    hook = getattr(model, ATTR, None)
    if hook is None:
        return False
    hook.set_state(strengths, prompt_len, enabled)
    return True


def detach_vllm_steering(model) -> bool:
    """Worker side of `VLLMEngine.detach_steering`: remove the hook (graph mode: zero the delta)."""
    hook = getattr(model, ATTR, None)
    if hook is None:
        return False
    hook.detach()
    delattr(model, ATTR)
    return True
