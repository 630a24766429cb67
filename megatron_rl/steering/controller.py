"""`SteeringController`: the API rollout engines and the trainer drive steering through.

Lifecycle (engine side):
    ctl = build_steering(cfg.steering, model)      # None when steering.enable is False
    ctl.set_strengths(strengths)                   # [B, F] per sample (or None: config defaults)
    ctl.set_positions(is_generated)                # [B, S] for the tokens of THIS forward:
                                                   #   prefill: all False; decode step: [B, 1] True
    logits = model(...)                            # the hook edits layer L's output in place of it
    with ctl.disabled(): ...                       # hook removed: zero cost, e.g. reference forward
    ctl.detach()

Per-sample strengths travel in the batch as the tensor `steer_strengths [B, F]`.
Steering is part of the behaviour policy: when the LLM is trained on steered rollouts, the
trainer must recompute old log-probs with the same per-sample strengths and positions
(`logprob_mode: recompute`) -- call set_strengths/set_positions per micro-batch.

The hook runs on every TP rank (hidden states are replicated across TP without sequence
parallelism; with it, each rank edits its own sequence chunk) and only on the pipeline stage
that owns layer L; other stages attach nothing.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_rl.steering.hooks import find_layer, hidden_of, replace_hidden
from megatron_rl.steering.interventions import Intervention

SCOPES = {"all": None, "prompt": lambda gen: ~gen, "generated": lambda gen: gen}


def _sequence_parallel_slice(mask: torch.Tensor, s_local: int) -> torch.Tensor:
    """This TP rank's chunk of a `[S, B, 1]` mask under sequence parallelism."""
    from megatron.core import parallel_state as ps

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if mask.shape[0] != s_local * tp:
        raise ValueError(f"steering positions cover {mask.shape[0]} tokens but the hooked layer saw {s_local} "
                         f"(TP={tp}); call set_positions with the current forward's [B, S] mask")
    return mask[rank * s_local:(rank + 1) * s_local]


def generated_positions(prompt_len: int, response_len: int, batch: int, device=None) -> torch.Tensor:
    """`[B, P + R]` is_generated mask for a `prompt_ids ++ response_ids` training forward."""
    gen = torch.zeros(batch, prompt_len + response_len, dtype=torch.bool, device=device)
    gen[:, prompt_len:] = True
    return gen


class SteeringController:
    """Edits the output of 0-indexed decoder layer `layer` with `intervention`, per sample."""

    def __init__(self, intervention: Intervention, layer: int, scope: str = "all"):
        if scope not in SCOPES:
            raise ValueError(f"steering.scope={scope!r} unknown; expected one of {sorted(SCOPES)}")
        self.intervention, self.layer, self.scope = intervention, int(layer), scope
        self._module = None        # the hooked TransformerLayer on this stage, None if not owned
        self._handle = None
        self._strengths: torch.Tensor | None = None      # [B, F] or None -> defaults
        self._is_generated: torch.Tensor | None = None   # [B, S] bool
        self._disabled = 0

    # --- lifecycle -----------------------------------------------------------------------------
    def attach(self, model) -> bool:
        """Register the hook if this pipeline stage owns the layer; returns whether it does."""
        self.detach()
        self._module = find_layer(model, self.layer)
        if self._module is not None:
            self._register()
        return self._module is not None

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._module = None, None

    @property
    def owns_layer(self) -> bool:
        return self._module is not None

    @property
    def active(self) -> bool:
        return self._handle is not None

    def _register(self):
        if self._handle is None and self._module is not None and not self._disabled:
            self._handle = self._module.register_forward_hook(self._hook)

    @contextmanager
    def disabled(self):
        """Steering off inside the block: the hook is removed (no cost), and restored after."""
        self._disabled += 1
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        try:
            yield self
        finally:
            self._disabled -= 1
            self._register()

    # --- per-forward state -----------------------------------------------------------------------
    def set_strengths(self, strengths: torch.Tensor | None) -> None:
        """Per-sample strengths `[B, F]` (F = intervention.n_strengths), or None for the defaults."""
        if strengths is not None:
            strengths = torch.as_tensor(strengths)
            if strengths.ndim == 1:
                strengths = strengths[None]
            if strengths.ndim != 2 or strengths.shape[1] != self.intervention.n_strengths:
                raise ValueError(f"steering strengths must be [B, {self.intervention.n_strengths}] "
                                 f"for mode {self.intervention.name!r}; got {tuple(strengths.shape)}")
        self._strengths = strengths

    def set_positions(self, is_generated: torch.Tensor | None) -> None:
        """`[B, S]` bool: which tokens of the current forward are generated (scope prompt/generated)."""
        if is_generated is not None:
            is_generated = torch.as_tensor(is_generated).bool()
            if is_generated.ndim != 2:
                raise ValueError(f"is_generated must be [B, S]; got {tuple(is_generated.shape)}")
        self._is_generated = is_generated

    def strengths_for(self, batch: int, device, dtype) -> torch.Tensor:
        """The `[1, B, F]` strengths the hook applies (broadcast over the sequence dimension)."""
        s = self._strengths if self._strengths is not None else self.intervention.default_strengths()[None]
        if s.shape[0] not in (1, batch):
            raise ValueError(f"steering strengths have {s.shape[0]} rows but the forward batch has {batch} "
                             f"samples; call set_strengths with one row per sample")
        return s.to(device=device, dtype=dtype)[None]

    def _scope_mask(self, s_local: int, batch: int, device):
        """`[S, B, 1]` bool, None (every position) or False (no position)."""
        pick = SCOPES[self.scope]
        if pick is None:
            return None
        if self._is_generated is None:
            raise RuntimeError(f"steering.scope={self.scope!r} needs set_positions(is_generated [B, S]) "
                               f"before each forward")
        gen = self._is_generated
        if gen.shape[0] != batch:
            raise ValueError(f"is_generated has {gen.shape[0]} rows but the forward batch has {batch}")
        mask = pick(gen)
        if not bool(mask.any()):       # checked where the engine keeps the mask (CPU: no device sync)
            return False
        mask = mask.to(device).t().unsqueeze(-1)            # [S, B, 1] to match sequence-first hidden
        if mask.shape[0] != s_local:
            mask = _sequence_parallel_slice(mask, s_local)
        return mask

    @contextmanager
    def use(self, strengths: torch.Tensor | None = None, is_generated: torch.Tensor | None = None):
        """Set strengths and positions for the forwards inside the block, restore them after.

        For the trainer's log-prob recompute per micro-batch: strengths = the batch's
        `steer_strengths [B, F]`, is_generated = `generated_positions(P, R, B)`.
        """
        saved = self._strengths, self._is_generated
        self.set_strengths(strengths)
        self.set_positions(is_generated)
        try:
            yield self
        finally:
            self._strengths, self._is_generated = saved

    # --- the hook --------------------------------------------------------------------------------
    def _hook(self, _module, _inputs, output):
        h = hidden_of(output)                               # [S, B, H]
        s_len, batch = h.shape[0], h.shape[1]
        mask = self._scope_mask(s_len, batch, h.device)
        if mask is False:                                   # no position of this forward is in scope
            return output
        work_dtype = self.intervention.sae.dtype
        s = self.strengths_for(batch, h.device, work_dtype)
        new = self.intervention.apply(h.to(work_dtype), s).to(h.dtype)
        if mask is not None:
            new = torch.where(mask, new, h)
        return replace_hidden(output, new)
