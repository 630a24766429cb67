"""models/rope_fusion.py: TE's fused RoPE only where Megatron can route to it and our layouts
allow (its GPU speed: docs/BENCHMARKS.md, tools/profile_update.py)."""
import pytest
import torch

from megatron_rl.models.rope_fusion import use_rope_fusion


@pytest.mark.parametrize("kw,expected", [
    (dict(is_mla=False, mrope=False, cp=1, cuda=True, importable=True), True),
    (dict(is_mla=False, mrope=False, cp=1, cuda=False, importable=True), False),   # CPU
    (dict(is_mla=False, mrope=False, cp=1, cuda=True, importable=False), False),   # no TE
    (dict(is_mla=True, mrope=False, cp=1, cuda=True, importable=True), False),     # MLA: YaRN-only fused path
    (dict(is_mla=False, mrope=True, cp=1, cuda=True, importable=True), False),     # M-RoPE (VL)
    (dict(is_mla=False, mrope=False, cp=2, cuda=True, importable=True), False),    # all-gather CP
])
def test_rope_fusion_choice(kw, expected):
    assert use_rope_fusion(**kw) is expected


def test_cpu_transformer_config_keeps_unfused_rope():
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.models.provider import transformer_config
    from megatron_rl.parallel import init_distributed

    if torch.cuda.is_available():
        pytest.skip("CPU default only")
    init_distributed()
    arch = arch_from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                "vocab_size": 256, "max_position_embeddings": 128})
    assert transformer_config(arch).apply_rope_fusion is False
