"""Model shapes the planner reads: `Shape` (the plan's subset of `ModelArch`), the public
presets, and resolving one from a preset name or an HF config.json."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_rl.plan import vision_memory as vis


@dataclass(frozen=True)
class Shape:
    """The model numbers the plan needs (a subset of `models.hf_config.ModelArch`)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    gated_mlp: bool = True            # SwiGLU (Llama, Qwen2)
    qk_layernorm: bool = False        # Qwen3: RMSNorm on q and k (2 x head_dim params per layer)
    num_experts: int = 0              # mixture of experts (0 = dense); terms in plan/moe_memory.py
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_layers: tuple[int, ...] | None = None   # 1 = sparse layer i; None with experts = every layer
    vision: vis.VisionShape | None = None       # vision-language: the tower (plan/vision_memory.py)
    is_mla: bool = False              # DeepSeek-V3 multi-latent attention (attention terms approximate)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def sparse_layers(self, first: int, count: int) -> int:
        """How many of layers [first, first + count) are MoE layers."""
        if not self.is_moe:
            return 0
        pattern = self.moe_layers or (1,) * self.num_layers
        return sum(pattern[first:first + count])


# Public shapes (the models' config.json files).
PRESETS: dict[str, Shape] = {
    "llama3-70b": Shape(80, 8192, 64, 8, 128, 28672, 128256, tie_word_embeddings=False),
    "qwen2-72b": Shape(80, 8192, 64, 8, 128, 29568, 152064, tie_word_embeddings=False, qkv_bias=True),
    "llama3-8b": Shape(32, 4096, 32, 8, 128, 14336, 128256, tie_word_embeddings=False),
    "llama-1b": Shape(16, 2048, 32, 8, 64, 8192, 128256, tie_word_embeddings=True),
    "smollm2-135m": Shape(30, 576, 9, 3, 64, 1536, 49152, tie_word_embeddings=True),
    "qwen3-8b": Shape(36, 4096, 32, 8, 128, 12288, 151936, qk_layernorm=True),
    "qwen3-30b-a3b": Shape(48, 2048, 32, 4, 128, 6144, 151936, qk_layernorm=True, num_experts=128, moe_top_k=8,
                           moe_ffn_hidden_size=768),
    "qwen3-235b-a22b": Shape(94, 4096, 64, 4, 128, 12288, 151936, qk_layernorm=True, num_experts=128, moe_top_k=8,
                             moe_ffn_hidden_size=1536),
}


def shape_from_arch(arch) -> Shape:
    """From a `ModelArch` (or anything with its field names)."""
    layers = getattr(arch, "moe_layers", None)
    return Shape(arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                 arch.ffn_hidden_size, arch.vocab_size, bool(arch.tie_word_embeddings), bool(arch.qkv_bias),
                 qk_layernorm=bool(getattr(arch, "qk_layernorm", False)),
                 num_experts=int(getattr(arch, "num_experts", 0) or 0), moe_top_k=int(getattr(arch, "moe_top_k", 0) or 0),
                 moe_ffn_hidden_size=int(getattr(arch, "moe_ffn_hidden_size", 0) or 0),
                 moe_layers=tuple(int(x) for x in layers) if layers else None, vision=vis.vision_shape(arch),
                 is_mla=bool(getattr(arch, "is_mla", False)))


def resolve_shape(spec: str | None, model_path: str = "") -> Shape:
    """A preset name, an HF config.json (or its directory), or else `model.path`'s config.json."""
    if spec and spec in PRESETS:
        return PRESETS[spec]
    target = spec or model_path
    if not target or not (Path(target).exists()):
        raise ValueError(f"model shape: {target!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
                         "existing HF config.json / model directory; pass --hf-config")
    from megatron_rl.models.hf_config import arch_from_hf_config
    return shape_from_arch(arch_from_hf_config(target))
