"""`model.fp8`: FP8 training GEMMs through Transformer Engine (Hopper and newer).

Megatron-Core applies TE's FP8 autocast itself once `TransformerConfig.fp8` is set
(`TransformerBlock.forward`: one outer context for the delayed recipe, one per layer
otherwise), so the whole feature is the config mapping below plus the checks:

- formats: `hybrid` (E4M3 forward, E5M2 gradients: the usual training choice) | `e4m3`;
- recipes: `delayed` (scales from an amax history of past steps: 1024 steps, max) |
  `tensorwise` (current per-tensor scaling: scales from this step's tensors);
- `model.fp8_bf16_layers: N` keeps the first and last N transformer layers in bf16
  (Megatron's `first_last_layers_bf16`; refused by Megatron under the delayed recipe);
- only the TE layer spec has FP8 GEMMs; bf16 parameters stay the master copy (no
  `fp8_param`), so checkpoints, the weight sync and the reference model are unchanged;
- FP8 GEMMs need every GEMM dimension divisible by 16 (TE asserts it): the hidden, FFN,
  QKV widths (checked by the plan) and the tokens of a micro-batch (packed streams are
  padded to a multiple of 16, `trainer/policy.py::packed_shape`).
"""
from __future__ import annotations

FP8_FORMATS = ("none", "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")
FP8_ALIGN = 16                      # TE: FP8 GEMM operands need dims % 16 (rows % 8; we pad tokens to 16)
AMAX_HISTORY_LEN = 1024             # delayed recipe (NeMo / Megatron-LM's usual training setting)
AMAX_COMPUTE_ALGO = "max"


def fp8_enabled(model_cfg) -> bool:
    return getattr(model_cfg, "fp8", "none") not in ("none", "", None)


def check_fp8_values(fp8: str, recipe: str, bf16_layers: int) -> None:
    """The values alone (no device or model): raises ValueError naming the key."""
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"model.fp8 must be one of {'|'.join(FP8_FORMATS)}, got {fp8!r}")
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe must be one of {'|'.join(FP8_RECIPES)}, got {recipe!r}")
    if bf16_layers < 0:
        raise ValueError(f"model.fp8_bf16_layers must be >= 0, got {bf16_layers}")
    if fp8 == "none" and (recipe != "delayed" or bf16_layers):
        key = "model.fp8_recipe" if recipe != "delayed" else "model.fp8_bf16_layers"
        raise ValueError(f"{key} is set but model.fp8 is none: it would change nothing (set model.fp8: hybrid)")
    if bf16_layers and recipe == "delayed":
        raise ValueError(f"model.fp8_bf16_layers={bf16_layers} needs model.fp8_recipe: tensorwise (Megatron-Core: "
                         "delayed scaling keeps one FP8 context over all layers and cannot leave some in bf16)")


def fp8_transformer_kwargs(fp8: str = "none", recipe: str = "delayed", bf16_layers: int = 0) -> dict:
    """`TransformerConfig` fields for `model.fp8` / `model.fp8_recipe` / `model.fp8_bf16_layers`
    ({} when FP8 is off)."""
    check_fp8_values(fp8, recipe, bf16_layers)
    if fp8 == "none":
        return {}
    kw = dict(fp8=fp8, fp8_recipe=recipe, fp8_margin=0, fp8_wgrad=True)
    if recipe == "delayed":
        kw.update(fp8_amax_history_len=AMAX_HISTORY_LEN, fp8_amax_compute_algo=AMAX_COMPUTE_ALGO)
    if bf16_layers:
        kw.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=bf16_layers,
                  num_layers_at_end_in_bf16=bf16_layers)
    return kw


def fp8_model_kwargs(model_cfg) -> dict:
    """The kwargs for the model section `model_cfg` (a `ModelConfig`)."""
    return fp8_transformer_kwargs(model_cfg.fp8, model_cfg.fp8_recipe, model_cfg.fp8_bf16_layers)


def fp8_problem(model_cfg, *, device: str, layer_spec: str, shape=None, engine: str = "vllm",
                max_tokens_per_microbatch: int = 0, pp: int = 1) -> str | None:
    """Why `model.fp8` cannot run as configured (None: it can). `layer_spec` is the resolved
    spec; `shape` a `plan.memory.Shape` or None (unknown: its checks are skipped)."""
    try:
        check_fp8_values(model_cfg.fp8, model_cfg.fp8_recipe, model_cfg.fp8_bf16_layers)
    except ValueError as e:
        return str(e)
    if not fp8_enabled(model_cfg):
        return None
    f = f"model.fp8={model_cfg.fp8}"
    if device != "cuda":
        return f"{f} needs a CUDA GPU with FP8 tensor cores (Hopper or newer) and Transformer Engine; device is {device}"
    if layer_spec != "te":
        return (f"{f} needs model.layer_spec te (or auto): only Transformer Engine's layers have FP8 GEMMs, "
                f"got {layer_spec}")
    if model_cfg.dtype != "bfloat16":
        return f"{f} needs model.dtype bfloat16 (the master weights and non-GEMM math), got {model_cfg.dtype}"
    if engine != "vllm":
        return (f"{f} with rollout.engine={engine}: the native engine decodes with the actor's FP8 layers a few rows "
                "per step, and FP8 GEMMs need row counts divisible by 16; use rollout.engine: vllm")
    if max_tokens_per_microbatch <= 0:
        return (f"{f} needs packed micro-batches (actor.max_tokens_per_microbatch > 0): packed streams are padded "
                "to a multiple of 16 tokens for the FP8 GEMMs; padded rows of any length are not")
    if shape is not None:
        if shape.is_moe:
            return (f"{f} on a mixture-of-experts model: not supported yet (expert GEMMs need per-expert token "
                    "padding to 16, Megatron's moe_router_padding_for_quantization; not wired or measured)")
        qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        dims = {"hidden_size": shape.hidden_size, "ffn_hidden_size": shape.ffn_hidden_size,
                "(heads + 2 * kv_heads) * head_dim": qkv, "heads * head_dim": shape.num_heads * shape.head_dim}
        bad = {k: v for k, v in dims.items() if v % FP8_ALIGN}
        if bad:
            return f"{f}: FP8 GEMMs need dimensions divisible by {FP8_ALIGN}; this model has {bad}"
        per_stage = shape.num_layers // max(pp, 1)
        if model_cfg.fp8_bf16_layers > per_stage:
            return (f"model.fp8_bf16_layers={model_cfg.fp8_bf16_layers} exceeds the layers per pipeline stage "
                    f"({per_stage}; Megatron-Core's bound)")
    return None
