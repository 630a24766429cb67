"""Build Megatron-Core `GPTModel`s (actor, reference, critic/discriminator trunk)
from a `ModelArch`, for the current tensor/pipeline-parallel rank."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rl.models.deepseek_v3 import mla_transformer_kwargs
from megatron_rl.models.hf_config import ModelArch, parse_dtype
from megatron_rl.models.layer_specs import get_layer_spec, resolve_layer_spec_name
from megatron_rl.models.moe import moe_transformer_kwargs
from megatron_rl.models.moe_config import MoEConfig
from megatron_rl.models.rope_fusion import use_rope_fusion


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron splits the vocabulary evenly over TP ranks; pad only when needed."""
    return ((vocab_size + tp - 1) // tp) * tp


def transformer_config(arch: ModelArch, dtype="float32", *, recompute: str | None = None,
                       sequence_parallel: bool = False, moe: MoEConfig | None = None, layer_spec: str = "local",
                       **overrides):
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer import TransformerConfig

    dt = parse_dtype(dtype)
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    if arch.num_kv_heads % tp:
        raise ValueError(f"num_key_value_heads={arch.num_kv_heads} is not divisible by tensor parallel size {tp}")
    if arch.num_layers % pp:
        raise ValueError(f"num_hidden_layers={arch.num_layers} is not divisible by pipeline parallel size {pp}")
    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    check_vpp_layout(arch.num_layers, pp, vpp)
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=use_rope_fusion(is_mla=arch.is_mla, mrope=bool(arch.mrope_section),
                                          cp=mpu.get_context_parallel_world_size()),   # models/rope_fusion.py
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        params_dtype=dt,
        pipeline_dtype=dt,
        bf16=(dt == torch.bfloat16),
        fp16=(dt == torch.float16),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        # model.cp: RoPE slices its table per CP rank; te's attention takes cp_comm_type None = p2p
        context_parallel_size=mpu.get_context_parallel_world_size(),
        # Interleaving exchanges activations and gradients with both neighbours at once; at
        # PP=2 both are one peer, and batch_isend_irecv (the default) pairs the two sends to
        # it with the receives in issue order, i.e. crosswise (wrong grads; found on gloo).
        # Megatron-LM runs interleaving with overlapped, unbatched p2p (even/odd ordering).
        overlap_p2p_comm=vpp is not None,
        batch_p2p_comm=vpp is None,
        sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
    )
    if recompute in ("selective", "full"):
        kwargs["recompute_granularity"] = recompute
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    elif recompute not in (None, "none"):
        raise ValueError(f"recompute must be none|selective|full, got {recompute!r}")
    kwargs.update(qk_layernorm=arch.qk_layernorm, **moe_transformer_kwargs(arch, moe, layer_spec))
    if arch.mrope_section:                      # vision-language: M-RoPE (models/vl)
        kwargs["mrope_section"] = list(arch.mrope_section)
    kwargs.update(mla_transformer_kwargs(arch))  # DeepSeek-V3 multi-latent attention (models/deepseek_v3.py)
    kwargs.update(overrides)
    if arch.is_mla:
        from megatron.core.transformer.transformer_config import MLATransformerConfig
        return MLATransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


def check_vpp_layout(num_layers: int, pp: int, vpp: int | None) -> None:
    """Interleaving needs a pipeline to interleave and an even split into pp*vpp chunks."""
    if vpp is None:
        return
    if vpp < 1:
        raise ValueError(f"model.vpp={vpp}: must be >= 1 (or null for no interleaving)")
    if pp == 1:
        raise ValueError(f"model.vpp={vpp} needs model.pp > 1: virtual pipeline stages interleave the "
                         "pipeline ranks' layer chunks (set model.vpp=null at model.pp=1)")
    if num_layers % (pp * vpp):
        raise ValueError(f"num_hidden_layers={num_layers} is not divisible by model.pp*model.vpp = {pp}*{vpp}")


def build_model_chunks(arch: ModelArch, dtype="float32", layer_spec: str = "local", **config_overrides) -> list:
    """This rank's GPTModel chunks: one per virtual pipeline stage (`model.vpp`), or one.

    The chunks share one `TransformerConfig` (Megatron's schedules read the first chunk's
    config, e.g. `finalize_model_grads_func`, for all of them). Chunk v of pipeline rank r
    holds the global layers of virtual stage v*pp + r (Megatron's
    `get_transformer_layer_offset`); the embedding lives in chunk 0 of rank 0, the final
    norm and output layer in the last chunk of the last rank.
    """
    from megatron.core import parallel_state as mpu

    cfg = transformer_config(arch, dtype, layer_spec=layer_spec, **config_overrides)
    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    return [_build_gpt(arch, cfg, layer_spec, v) for v in stages]


def build_model(arch: ModelArch, dtype="float32", layer_spec: str = "local", *,
                vp_stage: int | None = None, **config_overrides):
    """The GPTModel chunk for this rank (pre/post-process set from the PP stage).

    Logits come out vocab-parallel (`parallel_output=True`): `[seq, batch, vocab/tp]`
    or, through `megatron_rl.models.forward`, `[batch, seq, vocab/tp]`. Under `model.vpp`
    use `build_model_chunks` (every chunk, one shared config).
    """
    if vp_stage is None:
        check_single_chunk()
    return _build_gpt(arch, transformer_config(arch, dtype, layer_spec=layer_spec, **config_overrides),
                      layer_spec, vp_stage)


def check_single_chunk() -> None:
    """Refuse, naming `model.vpp`, a one-chunk build when this rank holds several chunks."""
    from megatron.core import parallel_state as mpu

    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None:
        raise ValueError(f"model.vpp={vpp}: this rank holds {vpp} model chunks; build them with "
                         "models.provider.build_model_chunks / models.loading.load_model_chunks "
                         "(this role supports one chunk only: set model.vpp=null)")


def _build_gpt(arch: ModelArch, cfg, layer_spec: str, vp_stage: int | None):
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    spec_name = resolve_layer_spec_name(layer_spec, cfg)
    if getattr(cfg, "fp8", None) and spec_name != "te":
        raise ValueError(f"model.fp8={cfg.fp8} needs model.layer_spec te (or auto): only Transformer Engine's "
                         f"layers have FP8 GEMMs, got {spec_name}")
    spec = get_layer_spec(spec_name, qk_layernorm=arch.qk_layernorm, config=cfg, vp_stage=vp_stage)
    tp = mpu.get_tensor_model_parallel_world_size()
    cls, vl_kwargs = GPTModel, {}
    if arch.is_vl:                              # GPTModel subclass + vision tower (models/vl)
        from megatron_rl.models.vl.model import vl_model_kwargs
        cls, vl_kwargs = vl_model_kwargs(arch, cfg, mpu.is_pipeline_first_stage(ignore_virtual=False,
                                                                                 vp_stage=vp_stage))
    model = cls(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="mrope" if arch.mrope_section else "rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
        **vl_kwargs,
    )
    model.arch = arch                   # what the weight mapping and engines read
    model.layer_spec_name = spec_name
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
