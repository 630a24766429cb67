"""The token-weights phase: `Trainer.token_weights(trainer, batch) -> metrics`.

Runs after advantages and before the actor update; leaves `batch["token_weights"]`
float `[B, R]` for the loss. Sources are registered by name (`token_weights.source`):
  reward  validate the weights the reward functions returned (RewardManager aligned them)
  vgr     recompute attention rows with the actor and turn them into VGR weights
Weights already in the batch from an earlier phase (e.g. steering's rollout IS
weights) are multiplied in, never replaced.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from megatron_rl.algos.vgr import clip_token_weights
from megatron_rl.data.batch import Batch
from megatron_rl.token_weights.metrics import token_weight_metrics

log = logging.getLogger(__name__)

SOURCES: dict[str, Callable] = {}


def register_source(name: str):
    def deco(cls):
        SOURCES[name] = cls
        return cls
    return deco


def build_token_weights(cfg, actor, tokenizer):
    """The phase for `cfg.token_weights.source`; makes the loss read `token_weights.apply_to`."""
    tw = cfg.token_weights
    if tw.source not in SOURCES:
        raise ValueError(f"token_weights.source must be one of {sorted(SOURCES)}, got {tw.source!r}")
    algos = getattr(cfg, "algos", None)
    if algos is not None:
        if algos.token_weights_apply_to != tw.apply_to:
            log.warning("token_weights.apply_to=%s overrides algos.token_weights_apply_to=%s",
                        tw.apply_to, algos.token_weights_apply_to)
        algos.token_weights_apply_to = tw.apply_to
    return SOURCES[tw.source](tw, actor, tokenizer)


def check_token_weights(weights: torch.Tensor, samples: list[dict], what: str = "token_weights") -> None:
    """Finite, non-negative, floating point; the error names the first bad sample."""
    if not weights.is_floating_point():
        raise TypeError(f"batch['{what}'] has dtype {weights.dtype}; expected floating point "
                        "(an integer cast drops fractional weights)")
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        i, t = (int(x) for x in torch.nonzero(bad)[0])
        uid = samples[i].get("uid", "?") if i < len(samples) else "?"
        raise ValueError(f"{what} of sample {i} (uid {uid}) at response token {t} is "
                         f"{weights[i, t].item()}; expected a finite value >= 0")


def _combine(batch: Batch, weights: torch.Tensor) -> None:
    prev = batch.get("token_weights")
    batch["token_weights"] = weights if prev is None else prev.float() * weights


@register_source("reward")
class RewardWeights:
    """Weights returned by reward functions (`{"score": s, "token_weights": [...]}`)."""

    def __init__(self, cfg, actor=None, tokenizer=None):
        self.cfg = cfg
        self._warned = False

    def __call__(self, trainer, batch: Batch) -> dict[str, float]:
        mask = batch["response_mask"].float()
        weights = batch.get("token_weights")
        if weights is None:
            uids = [s.get("uid", "?") for s in batch.samples[:3]]
            msg = (f"token_weights.source=reward but no reward function returned 'token_weights' "
                   f"for any of the {len(batch)} samples (first uids {uids}); training with weights 1")
            if self.cfg.missing == "error":
                raise ValueError(msg)
            if not self._warned:
                log.warning(msg)
                self._warned = True
            return {"token_weights/missing": 1.0}
        check_token_weights(weights, batch.samples)
        out = token_weight_metrics(weights, mask, batch.get("advantages"))
        out["token_weights/missing"] = 0.0
        return out


@register_source("vgr")
class VGRWeights:
    """VGR weights from the actor's attention of response tokens over the prompt."""

    def __init__(self, cfg, actor, tokenizer):
        from megatron_rl.token_weights.attention_rows import selected_layer_numbers, unwrap
        from megatron_rl.token_weights.context import ContextFinder

        self.cfg = cfg
        self.actor = actor
        self.find_context = ContextFinder(tokenizer, cfg.context_markers)
        self.layers = selected_layer_numbers(unwrap(actor.model).config.num_layers, cfg.last_k_layers)

    def __call__(self, trainer, batch: Batch) -> dict[str, float]:
        ctx, ins = self.find_context(batch["prompt_ids"], batch["prompt_mask"])
        raw = compute_vgr_weights(self.actor, batch, ctx, ins, self.layers, self.cfg)
        mask = batch["response_mask"].float()
        clip = tuple(self.cfg.clip) if self.cfg.clip is not None else None
        weights = clip_token_weights(raw, mask, clip)
        _combine(batch, weights)
        out = token_weight_metrics(weights, mask, batch.get("advantages"), unclipped=raw, clip=clip)
        out["token_weights/context_frac"] = float(ctx.sum() / batch["prompt_mask"].float().sum().clamp(min=1))
        return out


def compute_vgr_weights(actor, batch: Batch, context_mask: torch.Tensor, instruction_mask: torch.Tensor,
                        layers: list[int], cfg) -> torch.Tensor:
    """Unclipped VGR weights `[B, R]` (float32, mean 1 per sequence, 0 off the mask; 1 on
    the mask for prompts without context), one micro-batch of attention rows at a time.
    The math is `algos.vgr.vgr_token_weights`; this only feeds it attention rows."""
    from megatron_rl.algos.vgr import vgr_token_weights
    from megatron_rl.token_weights.attention_rows import attention_rows
    from megatron_rl.trainer.microbatch import make_microbatches

    size = cfg.micro_batch_size or actor.mbs
    device = next(actor.model.parameters()).device
    out = []
    for start, mb in zip(range(0, len(batch), size), make_microbatches(batch, size)):
        mb = {k: v.to(device) for k, v in mb.items()}
        real = int(mb["row_valid"].sum())
        rows = attention_rows(actor.model, mb, layers, actor._forward, cfg.row_chunk)   # [k, b, R, P]
        p = int(mb["prompt_len"])
        idx = torch.arange(start, start + real)
        w = vgr_token_weights([r[:real].unsqueeze(1) for r in rows], context_mask[idx], instruction_mask[idx],
                              mb["response_mask"][:real], smooth_sigma=cfg.smooth_sigma, clip=None,
                              prompt_mask=mb["attention_mask"][:real, :p])
        out.append(w.float().cpu())
    return torch.cat(out)
