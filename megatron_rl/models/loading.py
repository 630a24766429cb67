"""Weights in and out of Megatron `GPTModel` chunks, for any TP/PP/VPP layout.

Every function here takes one model or this rank's list of chunks (`model.vpp`: one
GPTModel per virtual pipeline stage, `load_model_chunks`), bare or DDP-wrapped.

- `load_hf_weights(model, hf_dir)`: each rank reads only the HF tensors its chunks
  need and keeps only its TP shard.
- `iter_hf_weights(model)`: yields full (TP=1, all stages) HF-named tensors on every
  rank, one parameter at a time (TP all-gather + PP broadcast): the stream used by
  HF export and rollout weight sync, in global layer order whatever the chunking.
- Megatron distributed checkpoints (`save_mcore_checkpoint` / `load_mcore_checkpoint`)
  are written and read by `megatron.core.dist_checkpointing`; its sharded keys use global
  layer numbers, so they load at any TP/PP/VPP.
- `load_model_chunks(path)` (every chunk) / `load_checkpoint(path)` (one chunk, no VPP)
  build the model for the current parallel layout from an HF directory or one of our
  Megatron checkpoints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rl.models.hf_config import ModelArch, arch_from_hf_config
from megatron_rl.models.hf_io import HFTensorReader
from megatron_rl.models.moe import expert_offset, expert_tp_layout, gather_expert, resident_name
from megatron_rl.models.weight_mapping import global_shape as mapping_global_shape
from megatron_rl.models.weight_mapping import (canonical_name, find_rule, fuse_hf, global_param_names,
                                               hf_names, local_to_global_name, split_to_hf, tp_shard,
                                               tp_unshard)

MCORE_META = "megatron_rl.json"
MCORE_FORMAT = "megatron_rl.mcore.v1"


def unwrap(model):
    """The GPTModel inside DDP/Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def as_chunks(model) -> list:
    """This rank's bare GPTModel chunks from one model or a list of (wrapped) chunks."""
    return [unwrap(c) for c in model] if isinstance(model, (list, tuple)) else [unwrap(model)]


def layer_offset(model) -> int:
    """Global index of a chunk's first layer (Megatron's layer_number is global, 1-based)."""
    layers = unwrap(model).decoder.layers
    return (layers[0].layer_number - 1) if len(layers) else 0


def iter_local_params(model) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, canonical global name, parameter) for every mapped parameter of every
    chunk; local names repeat across chunks, global names do not."""
    for m in as_chunks(model):
        off, e_off = layer_offset(m), expert_offset(m.arch)
        for name, p in m.named_parameters():
            yield name, local_to_global_name(canonical_name(name), off, e_off), p
        for name, b in m.named_buffers():      # DeepSeek-V3's aux-free bias: mapped, not optimised
            if name.endswith(".mlp.router.expert_bias"):
                yield name, local_to_global_name(name, off, e_off), b


def hf_source_name(gname: str, arch: ModelArch) -> str:
    # With tied embeddings a last pipeline stage still holds output_layer.weight: it
    # is initialised from the input embedding.
    if gname == "output_layer.weight" and arch.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    return gname


@torch.no_grad()
def load_hf_weights(model, hf_dir, arch: ModelArch | None = None) -> int:
    """Copy HF weights into this rank's chunks; returns the number of parameters set."""
    from megatron.core import parallel_state as mpu

    m = as_chunks(model)
    arch = arch or m[0].arch
    reader = hf_dir if isinstance(hf_dir, HFTensorReader) else HFTensorReader(hf_dir)
    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    etp, erank = expert_tp_layout()
    count = 0
    for lname, gname, p in iter_local_params(m):
        rule, layer = find_rule(hf_source_name(gname, arch), arch)
        full = fuse_hf(rule, [reader.get(n) for n in hf_names(rule, layer)], arch)
        shard = tp_shard(rule, full, erank, etp, arch) if rule.expert else tp_shard(rule, full, rank, tp, arch)
        if shard.shape != p.shape:
            raise ValueError(f"{reader.dir}: {', '.join(hf_names(rule, layer))} give shape "
                             f"{tuple(shard.shape)} for Megatron '{lname}' of shape {tuple(p.shape)}")
        p.copy_(shard.to(p.dtype))
        count += 1
    return count


@torch.no_grad()
def iter_full_mcore_weights(model, arch: ModelArch | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical global Megatron name, full TP=1 tensor) on every rank, one at a time, in
    global layer order: each comes from the pipeline rank whose chunk owns it."""
    from megatron.core import parallel_state as mpu

    chunks = as_chunks(model)
    arch = arch or chunks[0].arch
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    my_stage = mpu.get_pipeline_model_parallel_rank()
    local = {g: p for _, g, p in iter_local_params(chunks)}
    device = next(chunks[0].parameters()).device
    # Receivers must allocate exactly the owner's shape and dtype: norms may stay float32 in
    # a bf16 model, and NCCL does not check sizes (a byte-count mismatch hangs; gloo hid this).
    owners = _pp_owners(local) if pp > 1 else {}
    for gname in global_param_names(arch):
        rule, _ = find_rule(gname, arch)
        owner = owners[resident_name(gname, arch)][0] if pp > 1 else my_stage
        full = None
        if my_stage == owner and rule.expert:
            full = gather_expert(rule, gname, local, arch)     # over expert-TP and EP
        elif my_stage == owner:
            shard = local[gname].detach()
            if tp > 1 and rule.tp_dim is not None:
                parts = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(parts, shard.contiguous(), group=mpu.get_tensor_model_parallel_group())
                full = tp_unshard(rule, parts, arch)
            else:
                full = tp_unshard(rule, [shard], arch)
        if pp > 1:
            if full is None:
                full = torch.empty(mapping_global_shape(gname, arch), dtype=owners[resident_name(gname, arch)][1],
                                   device=device)
            group = mpu.get_pipeline_model_parallel_group()
            src = dist.get_process_group_ranks(group)[owner]
            full = full.contiguous()
            dist.broadcast(full, src=src, group=group)
        yield gname, full


def _pp_owners(local: dict) -> dict:
    """{global name: (owning pipeline rank, dtype)} over every pipeline rank (one small
    object all-gather): with VPP a rank's chunks hold non-contiguous layer ranges."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_pipeline_model_parallel_group()
    mine = {g: str(p.dtype).removeprefix("torch.") for g, p in local.items()}
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return {g: (stage, getattr(torch, d)) for stage, part in enumerate(parts) for g, d in part.items()}


def iter_hf_weights(model, arch: ModelArch | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors (e.g. for export or rollout weight sync), one at a time."""
    chunks = as_chunks(model)
    arch = arch or chunks[0].arch
    for gname, full in iter_full_mcore_weights(chunks, arch):
        rule, layer = find_rule(gname, arch)
        for hname, t in zip(hf_names(rule, layer), split_to_hf(rule, full, arch)):
            yield hname, t


# --- Megatron distributed checkpoints ----------------------------------------------

def _sharded_state_dict(chunks: list) -> dict:
    """One chunk: its sharded state dict (the layout of checkpoints before VPP); several:
    `{"model0": ..., "model1": ...}` as Megatron-LM nests them. Only the sharded keys
    (global layer numbers) reach the files, so either nesting loads the other."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def sharded_model_state_dict(model) -> dict:
    """The model's sharded state dict as the checkpoint nests it (what an optimizer's
    `sharded_state_dict(model_sharded_state_dict)` maps its state onto)."""
    return _sharded_state_dict(as_chunks(model))


def save_mcore_checkpoint(model, out_dir, arch: ModelArch | None = None, extra_meta: dict | None = None,
                          extra_state=None, async_save: bool = False):
    """Every chunk of every rank into one dist-checkpoint (call on all ranks). `extra_state`:
    `model_sharded_state_dict -> dict` of more entries for the same checkpoint (the optimizer).
    `async_save`: the tensor files are not written yet; returns Megatron's `AsyncRequest` that
    writes them (trainer/async_save.py schedules it), else None."""
    from megatron.core import dist_checkpointing

    chunks = as_chunks(model)
    arch = arch or chunks[0].arch
    out = Path(out_dir)
    (out / "model").mkdir(parents=True, exist_ok=True)
    state = _sharded_state_dict(chunks)
    if extra_state is not None:
        state = {**state, **extra_state(state)}
    request = dist_checkpointing.save(state, str(out / "model"), async_sharded_save=async_save)
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = {"format": MCORE_FORMAT, "arch": arch.to_dict(), **(extra_meta or {})}
        with open(out / MCORE_META, "w") as f:
            json.dump(meta, f, indent=2)
    if dist.is_initialized():
        dist.barrier()
    return request


def load_mcore_checkpoint(model, ckpt_dir) -> None:
    """Fill every chunk from a dist-checkpoint saved at any TP/PP/VPP (call on all ranks)."""
    from megatron.core import dist_checkpointing

    chunks = as_chunks(model)
    d = Path(ckpt_dir) / "model"
    if not d.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no 'model' folder (not a megatron-rl Megatron checkpoint)")
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(d))
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=False)
        return
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"model{i}"], strict=False)


def read_checkpoint_arch(path) -> tuple[str, ModelArch]:
    """('mcore' | 'hf', arch) for a checkpoint directory."""
    p = Path(path)
    if (p / MCORE_META).exists():
        with open(p / MCORE_META) as f:
            meta = json.load(f)
        if meta.get("format") != MCORE_FORMAT:
            raise ValueError(f"{p / MCORE_META}: format {meta.get('format')!r}, expected {MCORE_FORMAT!r}")
        return "mcore", ModelArch.from_dict(meta["arch"])
    if (p / "config.json").exists():
        return "hf", arch_from_hf_config(p)
    raise FileNotFoundError(f"{p}: neither an HF checkpoint (config.json) nor a megatron-rl checkpoint ({MCORE_META})")


def load_model_chunks(path: str | os.PathLike, *, dtype="float32", layer_spec: str = "auto",
                      **build_kwargs) -> list:
    """This rank's GPTModel chunks (one per `model.vpp` stage, else one) with weights from
    `path` (HF directory or megatron-rl checkpoint). `build_kwargs`: `recompute`,
    `sequence_parallel`, other TransformerConfig overrides; `freeze_vision` (`model.freeze_vision`,
    vision-language checkpoints only) keeps the vision tower's parameters without gradients.
    Call `megatron_rl.parallel.init_distributed(...)` first."""
    from megatron_rl.models.provider import build_model_chunks

    kind, arch = read_checkpoint_arch(path)
    freeze_vision = build_kwargs.pop("freeze_vision", True)
    if not freeze_vision and not arch.is_vl:
        raise ValueError(f"model.freeze_vision=false: {path} is a text-only model ({arch.hf_architecture}), "
                         "it has no vision tower to train; leave model.freeze_vision at true")
    chunks = build_model_chunks(arch, dtype=dtype, layer_spec=layer_spec, **build_kwargs)
    if kind == "hf":
        load_hf_weights(chunks, path, arch)
    else:
        load_mcore_checkpoint(chunks, path)
    if arch.is_vl:
        from megatron_rl.models.vl.model import set_vision_trainable
        set_vision_trainable(chunks, not freeze_vision)
    return chunks


def load_checkpoint(path: str | os.PathLike, dtype="float32", layer_spec: str = "auto", **build_kwargs):
    """Build the single GPTModel chunk for this rank and load weights from `path`; under
    `model.vpp` this is refused by name (use `load_model_chunks`).

    Call `megatron_rl.parallel.init_distributed(...)` first.
    """
    from megatron_rl.models.provider import check_single_chunk

    check_single_chunk()
    return load_model_chunks(path, dtype=dtype, layer_spec=layer_spec, **build_kwargs)[0]
