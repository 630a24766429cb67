"""The world layout of a run (TP x PP x CP x DP, EP) and the model shape it is checked against.

Checked once at plan time, with errors naming the config key: `world_size % (tp*pp*cp)`,
`model.vpp` (needs pp > 1 and layers % (pp*vpp)), layers % pp, heads and KV heads % tp;
`model.ep`/`model.etp` need an MoE model, experts % ep and world % (etp*ep*pp).
The shape comes from `model.path` (an HF config.json or a megatron-rl checkpoint's meta),
else from a public preset matched by the path's name (the 70B configs point at placeholder
paths), else it is unknown and the shape checks are skipped (the summary says so).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_rl.config.loader import ConfigError
from megatron_rl.plan.memory import PRESETS, Shape, resolve_shape, shape_from_arch

DEVICES = ("cpu", "cuda")

# Public checkpoint names (a directory's basename, lower case, "-instruct" dropped) -> preset.
PRESET_NAMES = {
    "meta-llama-3-70b": "llama3-70b", "llama-3-70b": "llama3-70b", "meta-llama-3.1-70b": "llama3-70b",
    "llama-3.1-70b": "llama3-70b", "llama-3.3-70b": "llama3-70b",
    "qwen2-72b": "qwen2-72b", "qwen2.5-72b": "qwen2-72b",
    "meta-llama-3-8b": "llama3-8b", "llama-3-8b": "llama3-8b", "meta-llama-3.1-8b": "llama3-8b",
    "llama-3.1-8b": "llama3-8b", "llama-3.2-1b": "llama-1b", "smollm2-135m": "smollm2-135m",
    "qwen3-8b": "qwen3-8b", "qwen3-30b-a3b": "qwen3-30b-a3b", "qwen3-235b-a22b": "qwen3-235b-a22b",
}


class PlanError(ConfigError):
    """A config the run plan cannot honour; the message names the key(s) and the numbers."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    vpp: int | None
    cp: int
    ep: int
    etp: int
    dp: int
    device: str                 # cpu | cuda
    sequence_parallel: bool     # effective: requested and tp > 1


@dataclass(frozen=True)
class ModelPlan:
    """What the memory planner and the summary need to know about the model."""
    shape: Shape | None         # None: unknown (model.path not on this machine, no preset matched)
    shape_source: str           # where the shape came from, or why it is unknown
    dtype: str
    layer_spec: str
    recompute: str
    distributed_optimizer: bool
    freeze_vision: bool = True  # model.freeze_vision (vision-language models)
    image_tokens: int = 0       # image-pad tokens per sample, worst case (plan/vision_memory.py)
    layer_spec_choice: str = ""  # what model.layer_spec resolves to on this device (models/layer_specs.py)
    layer_spec_reason: str = ""
    fp8: str = "none"           # model.fp8 (none | hybrid | e4m3), with fp8_recipe
    fp8_recipe: str = "delayed"


def model_shape(model_path: str, spec: str | None = None) -> tuple[Shape | None, str]:
    """(shape, source): `spec` (preset or config.json) wins, then `model.path`'s own files,
    then a preset matched by `model.path`'s name; (None, reason) when none applies."""
    if spec:
        return resolve_shape(spec), f"--shape {spec}"
    if not model_path:
        return None, "unknown: model.path is empty (shape checks skipped)"
    p = Path(model_path)
    if p.exists():
        from megatron_rl.models.loading import read_checkpoint_arch
        kind, arch = read_checkpoint_arch(p)
        return shape_from_arch(arch), f"{kind} checkpoint {p}"
    name = p.name.lower().removesuffix("-instruct")
    if name in PRESET_NAMES:
        preset = PRESET_NAMES[name]
        return PRESETS[preset], f"preset {preset} (model.path not on this machine; matched its name {p.name!r})"
    return None, f"unknown: model.path {model_path!r} does not exist here (shape checks skipped)"


def check_expert_parallel(m, world_size: int, shape: Shape | None) -> None:
    """`model.ep` / `model.etp` against the model and Megatron's expert grid (etp x ep x edp x pp).

    EP needs a mixture-of-experts model whose expert count it divides; `world % (etp*ep*pp)`
    (Megatron's `initialize_model_parallel`); `moe_ffn_hidden_size % etp`. An unknown shape
    skips the model checks (the trainer reads model.path, so they run there)."""
    ep, etp = m.ep, m.etp
    if world_size % (etp * ep * m.pp):
        raise PlanError(f"world size {world_size} is not divisible by model.etp * model.ep * model.pp = "
                        f"{etp} * {ep} * {m.pp} = {etp * ep * m.pp} (Megatron's expert grid)")
    if shape is not None and not shape.is_moe:
        check_no_moe_options(m.moe)
    if shape is None or (ep == 1 and etp == 1):
        return
    if not shape.is_moe:
        key, value = ("model.ep", ep) if ep > 1 else ("model.etp", etp)
        raise PlanError(f"{key}={value}: expert parallelism needs a mixture-of-experts model; this one is dense "
                        "(no experts; set it to 1)")
    if shape.num_experts % ep:
        raise PlanError(f"model.ep={ep}: num_experts={shape.num_experts} is not divisible by it")
    if shape.moe_ffn_hidden_size % etp:
        raise PlanError(f"model.etp={etp}: moe_ffn_hidden_size={shape.moe_ffn_hidden_size} is not divisible by it")


def check_no_moe_options(moe) -> None:
    """`model.moe.*` set away from its defaults on a dense model would change nothing: refused."""
    from dataclasses import fields

    from megatron_rl.models.moe_config import MoEConfig

    default = MoEConfig()
    changed = [f.name for f in fields(moe) if getattr(moe, f.name) != getattr(default, f.name)]
    if changed:
        raise PlanError(f"model.moe.{changed[0]}={getattr(moe, changed[0])!r}: the model is dense (no experts), "
                        f"so the model.moe section has no effect; remove it")


def check_context_parallel(m, shape: Shape | None) -> None:
    """`model.cp > 1` against the rest of the model section (parallel/context_parallel.py covers
    dense text models; docs/run_plan.md)."""
    cp = m.cp
    if cp == 1:
        return
    if m.ep > 1 or m.etp > 1 or (shape is not None and shape.is_moe):
        raise PlanError(f"model.cp={cp}: not covered for mixture-of-experts models (router aux losses and token "
                        "dispatch are untested under CP); set model.cp=1")
    if shape is not None and shape.vision is not None:
        raise PlanError(f"model.cp={cp}: not covered for vision-language models (M-RoPE positions and image "
                        "features are laid out per whole row); set model.cp=1")
    if shape is not None and shape.is_mla:
        raise PlanError(f"model.cp={cp}: not covered for multi-latent attention (DeepSeek-V3 runs on the local "
                        "spec, which has no context-parallel attention); set model.cp=1")


def check_context_parallel_run(cfg, layer_spec: str) -> None:
    """`model.cp > 1` against the other sections, once the layer spec is resolved: the spec must
    have CP attention (sdpa: padded and packed; te: packed THD only, its CP attention takes no
    padding mask); roles and phases that read a forward's internals per whole row are refused."""
    cp = cfg.model.cp
    if cp == 1:
        return
    packed = cfg.actor.max_tokens_per_microbatch > 0
    if layer_spec == "local":
        raise PlanError(f"model.cp={cp}: model.layer_spec={cfg.model.layer_spec} resolves to local, which has no "
                        "context-parallel attention; set model.layer_spec=sdpa (or te with "
                        "actor.max_tokens_per_microbatch > 0)")
    if layer_spec == "te" and not packed:
        raise PlanError(f"model.cp={cp} with layer spec te needs packed micro-batches: te's context-parallel "
                        "attention takes no padding mask; set actor.max_tokens_per_microbatch > 0 or "
                        "model.layer_spec=sdpa")
    if layer_spec == "te" and (cfg.critic.enable or cfg.reward.model.path):
        what = "critic.enable=true" if cfg.critic.enable else "reward.model.path"
        raise PlanError(f"model.cp={cp} with layer spec te: {what} runs padded value forwards, which te's CP "
                        "attention cannot mask; set model.layer_spec=sdpa")
    refused = [("gad.enable=true", cfg.gad.enable, "the discriminator's and SFT warm-up's forwards are not split"),
               ("steering.enable=true", cfg.steering.enable, "SAE hooks edit whole rows of the residual stream"),
               (f"token_weights.source={cfg.token_weights.source}", cfg.token_weights.source == "vgr",
                "attention rows are read from whole-sequence attention")]
    for key, on, why in refused:
        if on:
            raise PlanError(f"model.cp={cp} with {key}: not covered ({why}); set model.cp=1")
    r = cfg.rollout
    if r.engine == "native" and layer_spec != "sdpa":
        raise PlanError(f"model.cp={cp} with rollout.engine=native needs model.layer_spec=sdpa (the native engine "
                        f"decodes whole sequences on every CP rank; {layer_spec}'s attention would split them)")
    if r.engine == "vllm" and r.placement == "colocated" and r.vllm.tensor_parallel_size % (cfg.model.tp * cp):
        raise PlanError(f"model.cp={cp}: rollout.vllm.tensor_parallel_size={r.vllm.tensor_parallel_size} must be a "
                        f"multiple of model.tp * model.cp = {cfg.model.tp * cp}: the CP ranks of a data-parallel rank "
                        "split the same rows, so one vLLM engine must generate them for all of those ranks")


def resolve_layout(m, world_size: int, device: str, shape: Shape | None) -> Layout:
    """`m` is the `model:` section. Raises `PlanError` naming the key that does not fit."""
    if device not in DEVICES:
        raise PlanError(f"device must be one of {'|'.join(DEVICES)}, got {device!r}")
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")
    for key in ("tp", "pp", "cp", "ep", "etp"):
        if getattr(m, key) < 1:
            raise PlanError(f"model.{key} must be >= 1, got {getattr(m, key)}")
    check_context_parallel(m, shape)
    check_expert_parallel(m, world_size, shape)
    mp = m.tp * m.pp * m.cp
    if world_size % mp:
        raise PlanError(f"world size {world_size} is not divisible by model.tp * model.pp * model.cp = "
                        f"{m.tp} * {m.pp} * {m.cp} = {mp}")
    if m.vpp is not None:
        if m.vpp < 1:
            raise PlanError(f"model.vpp must be >= 1 (or null), got {m.vpp}")
        if m.pp < 2:
            raise PlanError(f"model.vpp={m.vpp} needs model.pp > 1 (interleaving splits pipeline stages), "
                            f"got model.pp={m.pp}")
    if shape is not None:
        check_shape(m, shape)
    return Layout(world_size=world_size, tp=m.tp, pp=m.pp, vpp=m.vpp, cp=m.cp, ep=m.ep, etp=m.etp,
                  dp=world_size // mp, device=device, sequence_parallel=bool(m.sequence_parallel and m.tp > 1))


def check_shape(m, s: Shape) -> None:
    if m.vpp is not None and s.num_layers % (m.pp * m.vpp):
        raise PlanError(f"model.vpp={m.vpp}: num_layers={s.num_layers} is not divisible by model.pp * model.vpp "
                        f"= {m.pp} * {m.vpp} = {m.pp * m.vpp}")
    if s.num_layers % m.pp:
        raise PlanError(f"model.pp={m.pp}: num_layers={s.num_layers} is not divisible by it")
    if s.num_kv_heads % m.tp:
        raise PlanError(f"model.tp={m.tp}: num_kv_heads={s.num_kv_heads} is not divisible by it")
    if s.num_heads % m.tp:
        raise PlanError(f"model.tp={m.tp}: num_heads={s.num_heads} is not divisible by it")
