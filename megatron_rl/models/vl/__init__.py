"""Vision-language models (Qwen2-VL, Qwen2.5-VL): Megatron GPTModel with M-RoPE plus
transformers' vision tower (docs/VISION_LANGUAGE.md)."""
from megatron_rl.models.vl.config import VL_ARCHITECTURES, VL_FAMILIES
from megatron_rl.models.vl.rope_index import mrope_position_ids, mrope_position_ids_and_deltas

__all__ = ["VL_ARCHITECTURES", "VL_FAMILIES", "mrope_position_ids", "mrope_position_ids_and_deltas"]
