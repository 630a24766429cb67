"""The vision tower's terms of the memory plan (Qwen2-VL / Qwen2.5-VL, models/vl/).

Image-pad tokens are prompt tokens, so the language model's terms already hold them
within `seq_len`; what a vision-language model adds, on the first pipeline stage only:

- vision weights:  the whole tower on every TP rank (replicated, models/vl/vision.py), in
                   the model dtype, counted into the stage's parameters (actor, reference,
                   critic alike);
- grads/optimizer: only with `model.freeze_vision: false` (frozen: none);
- activations:     with the tower trained, every ViT block keeps per patch
                   u*(8h + 2h + 4h + 2h + 2f*(2 gated | 1) + 2f) bytes (the planner's
                   generalised Korthikanti terms, MHA, no dropout, flash attention) for
                   `image_tokens * merge^2` patches of each sample; frozen (and in the
                   log-prob pass) only one block's working set is alive.
Image tokens per sample (worst case): data.image.max_images x max_pixels / (patch*merge)^2,
capped by data.max_prompt_length (the pads live in the prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

QWEN2_VL_DEFAULT_MAX_PIXELS = 12845056       # Qwen2-VL image processor's default max_pixels


@dataclass(frozen=True)
class VisionShape:
    params: int                 # tower parameters (patch embed, blocks, merger)
    depth: int
    hidden_size: int
    ffn_hidden_size: int
    gated_mlp: bool             # Qwen2.5-VL: SwiGLU; Qwen2-VL: GELU fc1/fc2
    patch_size: int
    merge_size: int


def vision_shape(arch) -> VisionShape | None:
    """From a VL `ModelArch` (None for text models)."""
    if not getattr(arch, "is_vl", False):
        return None
    from megatron_rl.models.vl.vision import vision_param_count

    v = arch.vl_config["vision_config"]
    gated = arch.family == "qwen2_5_vl"
    hidden = v.get("hidden_size", 1280) if gated else v.get("embed_dim", 1280)
    ffn = v.get("intermediate_size", 3420) if gated else int(hidden * v.get("mlp_ratio", 4))
    return VisionShape(vision_param_count(arch), int(v.get("depth", 32)), int(hidden), int(ffn), gated,
                       int(v.get("patch_size", v.get("spatial_patch_size", 14))), int(v.get("spatial_merge_size", 2)))


def image_tokens_per_sample(image_cfg, vs: VisionShape | None, prompt_tokens: int) -> int:
    """Worst-case image-pad tokens of one sample (0 for a text model)."""
    if vs is None:
        return 0
    pixels = image_cfg.max_pixels or QWEN2_VL_DEFAULT_MAX_PIXELS
    per_image = max(1, pixels // (vs.patch_size * vs.merge_size) ** 2)
    return min(prompt_tokens, image_cfg.max_images * per_image)


def check_freeze_vision(freeze_vision: bool, shape) -> None:
    """`model.freeze_vision: false` on a text model would change nothing: refused by name."""
    from megatron_rl.plan.layout import PlanError

    if not freeze_vision and shape is not None and shape.vision is None:
        raise PlanError("model.freeze_vision=false: the model is text-only (no vision tower to train); "
                        "leave model.freeze_vision at true")


def check_packing_with_vision(max_tokens_per_microbatch: int, shape) -> None:
    """Packed micro-batches with a vision-language model: refused up front by name (the actor
    would refuse at its first log-prob pass): M-RoPE positions and image features are laid
    out per padded row."""
    from megatron_rl.plan.layout import PlanError

    if max_tokens_per_microbatch and max_tokens_per_microbatch > 0 and shape is not None \
            and shape.vision is not None:
        raise PlanError(f"actor.max_tokens_per_microbatch={max_tokens_per_microbatch} (packed micro-batches) "
                        "cannot be used with a vision-language model: M-RoPE positions and image features are "
                        "laid out per padded row; set actor.max_tokens_per_microbatch=0")


def block_activation_bytes(vs: VisionShape, patches: int, act_bytes: int) -> float:
    """One ViT block's saved activations for `patches` patch tokens."""
    h, f, u = vs.hidden_size, vs.ffn_hidden_size, act_bytes / 2
    per_patch = u * (8 * h + 2 * h + 4 * h + 2 * h + 2 * f * (2 if vs.gated_mlp else 1) + 2 * f)
    return per_patch * patches


def vision_activation_bytes(vs: VisionShape | None, image_tokens: int, micro: int, act_bytes: int,
                            trainable: bool) -> float:
    """The tower's activations for one micro-batch on the first stage (0 without images)."""
    if vs is None or image_tokens == 0:
        return 0.0
    one = block_activation_bytes(vs, image_tokens * vs.merge_size ** 2 * micro, act_bytes)
    return one * vs.depth if trainable else one


def frozen_vision_params(shape, stage: str, trainable: bool) -> int:
    """Tower parameters on this stage that have no gradient or optimizer state."""
    vs = getattr(shape, "vision", None)
    if vs is None or trainable or stage not in ("first", "only"):
        return 0
    return vs.params
