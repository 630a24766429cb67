"""From a `SteeringConfig` to an attached `SteeringController` (or None when steering is off)."""
from __future__ import annotations

from megatron_rl.steering.config import SteeringConfig
from megatron_rl.steering.controller import SteeringController
from megatron_rl.steering.hooks import unwrap_chunk, num_layers
from megatron_rl.steering.interventions import build_intervention
from megatron_rl.steering.sae import SAE, load_sae

LOGPROB_MODES = ("recompute", "rollout_is")


def resolve_layer(cfg: SteeringConfig, sae: SAE, n_layers: int | None = None) -> int:
    layer = cfg.layer if cfg.layer is not None else sae.hook_layer
    if layer is None:
        raise ValueError(f"SAE {sae.source} hook_name={sae.hook_name!r} is not a residual-stream hook; "
                         f"set steering.layer (0-indexed decoder layer whose output is steered)")
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(f"steering layer {layer} out of range for a model with {n_layers} layers")
    return layer


def build_steering(cfg: SteeringConfig, model=None, sae: SAE | None = None) -> SteeringController | None:
    """Load the SAE, check it against the model, build the intervention and attach the hook.

    Returns None when `cfg.enable` is False: no SAE is read and no hook exists.
    """
    if not cfg.enable:
        return None
    if cfg.logprob_mode not in LOGPROB_MODES:
        raise ValueError(f"steering.logprob_mode={cfg.logprob_mode!r}; expected one of {LOGPROB_MODES}")
    if sae is None:
        if not cfg.sae_path:
            raise ValueError("steering.enable is true but steering.sae_path is empty")
        sae = load_sae(cfg.sae_path, cfg.sae_id)
    n_layers = None
    if model is not None:
        chunk = unwrap_chunk(model[0] if isinstance(model, (list, tuple)) else model)
        sae.check_d_in(chunk.config.hidden_size)
        n_layers = num_layers(model)
        sae = sae.to(next(chunk.parameters()).device)
    intervention = build_intervention(cfg.mode, sae, feature_idxs=cfg.feature_idxs,
                                      max_activations=cfg.max_activations, strengths=cfg.strengths,
                                      global_strength=cfg.global_strength)
    ctl = SteeringController(intervention, resolve_layer(cfg, sae, n_layers), scope=cfg.scope)
    if model is not None:
        ctl.attach(model)
    return ctl
