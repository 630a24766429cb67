"""Qwen2-VL / Qwen2.5-VL `config.json` -> `ModelArch` (the language model's shape plus the
M-RoPE sections and the full HF config, which the vision tower and the position ids read).

Both the flat layout of the hub checkpoints (text fields at the top, `rope_scaling:
{type: mrope, mrope_section}`) and transformers 5's nested `text_config` are read.
The language model is a Qwen2 decoder (q/k/v bias), so its fields go through the same
checks as Qwen2ForCausalLM; anything else we cannot reproduce is an error naming the field.
"""
from __future__ import annotations

from dataclasses import replace

VL_ARCHITECTURES = {"Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen2VLForConditionalGeneration": "qwen2_vl"}
VL_FAMILIES = tuple(VL_ARCHITECTURES.values())


def text_config(cfg: dict) -> dict:
    """The language model's fields: `text_config` (transformers 5) over the top level (hub)."""
    top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    return {**top, **(cfg.get("text_config") or {})}


def mrope_section_of(text: dict, head_dim: int) -> list[int]:
    """`rope_scaling` / `rope_parameters` -> mrope_section, refusing any other RoPE variant."""
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    field = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    if kind not in ("mrope", "default"):
        raise ValueError(f"config.json field '{field}' = {rope!r} is not supported for Qwen2-VL / Qwen2.5-VL "
                         "(only M-RoPE: type mrope or default, with mrope_section)")
    section = rope.get("mrope_section")
    if not section or len(section) != 3:
        raise ValueError(f"config.json field '{field}.mrope_section' = {section!r}: expected 3 sections "
                         "(temporal, height, width)")
    if sum(section) * 2 != head_dim:
        raise ValueError(f"config.json field '{field}.mrope_section' = {section} sums to {sum(section)}, "
                         f"expected head_dim / 2 = {head_dim // 2}")
    return [int(s) for s in section]


def vl_arch_from_hf(cfg: dict, architecture: str):
    """ModelArch of a Qwen2-VL / Qwen2.5-VL checkpoint."""
    from megatron_rl.models.hf_config import arch_from_hf_config

    text = text_config(cfg)
    if cfg.get("vision_config") is None:
        raise ValueError(f"config.json of {architecture} has no 'vision_config'")
    if cfg.get("image_token_id", text.get("image_token_id")) is None:
        raise ValueError("config.json field 'image_token_id' is missing (the image-pad token id)")
    rope = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    as_qwen2 = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_parameters")}
    as_qwen2.update(architectures=["Qwen2ForCausalLM"], rope_theta=text.get("rope_theta", rope.get("rope_theta",
                                                                                                  1000000.0)))
    as_qwen2["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    lm = arch_from_hf_config(as_qwen2)
    return replace(lm, family=VL_ARCHITECTURES[architecture], hf_architecture=architecture,
                   mrope_section=mrope_section_of(text, lm.head_dim), vl_config=cfg)


def hf_transformers_config(arch_or_cfg):
    """The transformers config object (Qwen2_5_VLConfig / Qwen2VLConfig) of a VL arch or config dict."""
    import transformers

    cfg = arch_or_cfg.vl_config if hasattr(arch_or_cfg, "vl_config") else arch_or_cfg
    if not isinstance(cfg, dict):
        return cfg
    arch = (cfg.get("architectures") or [None])[0]
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen2_vl": transformers.Qwen2VLConfig}[VL_ARCHITECTURES[arch]]
    body = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
    out = cls(**body)
    out.architectures = [arch]
    return out


# transformers 4.52 - 4.5x saved Qwen2-VL / Qwen2.5-VL with its module names; the hub (and
# transformers 5) use these. Read either: `HFTensorReader` renames on open.
_MODULE_TO_HUB = (("model.language_model.", "model."), ("model.visual.", "visual."))


def hub_tensor_names(names) -> dict[str, str]:
    """{hub name: stored name} for checkpoints stored under the module names, else {}."""
    out = {}
    for n in names:
        for stored, hub in _MODULE_TO_HUB:
            if n.startswith(stored):
                out[hub + n[len(stored):]] = n
    return out
