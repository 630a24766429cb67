"""Weights in and out of Megatron `GPTModel` chunks, for any TP/PP layout.

- `load_hf_weights(model, hf_dir)`: each rank reads only the HF tensors its chunk
  needs and keeps only its TP shard.
- `iter_hf_weights(model)`: yields full (TP=1, all stages) HF-named tensors on every
  rank, one parameter at a time (TP all-gather + PP broadcast): the stream used by
  HF export and rollout weight sync.
- Megatron distributed checkpoints (`save_mcore_checkpoint` / `load_mcore_checkpoint`)
  are written and read by `megatron.core.dist_checkpointing`, so they load at any TP/PP.
- `load_checkpoint(path)` builds the model for the current parallel layout from an
  HF directory or one of our Megatron checkpoints.
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


def layer_offset(model) -> int:
    layers = unwrap(model).decoder.layers
    return (layers[0].layer_number - 1) if len(layers) else 0


def iter_local_params(model) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, canonical global name, parameter) for every mapped parameter."""
    m = unwrap(model)
    off = layer_offset(m)
    for name, p in m.named_parameters():
        yield name, local_to_global_name(canonical_name(name), off), p


def _hf_source_name(gname: str, arch: ModelArch) -> str:
    # With tied embeddings a last pipeline stage still holds output_layer.weight: it
    # is initialised from the input embedding.
    if gname == "output_layer.weight" and arch.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    return gname


@torch.no_grad()
def load_hf_weights(model, hf_dir, arch: ModelArch | None = None) -> int:
    """Copy HF weights into this rank's chunk; returns the number of parameters set."""
    from megatron.core import parallel_state as mpu

    m = unwrap(model)
    arch = arch or m.arch
    reader = hf_dir if isinstance(hf_dir, HFTensorReader) else HFTensorReader(hf_dir)
    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    count = 0
    for lname, gname, p in iter_local_params(m):
        rule, layer = find_rule(_hf_source_name(gname, arch))
        full = fuse_hf(rule, [reader.get(n) for n in hf_names(rule, layer)], arch)
        shard = tp_shard(rule, full, rank, tp, arch)
        if shard.shape != p.shape:
            raise ValueError(f"{reader.dir}: {', '.join(hf_names(rule, layer))} give shape "
                             f"{tuple(shard.shape)} for Megatron '{lname}' of shape {tuple(p.shape)}")
        p.copy_(shard.to(p.dtype))
        count += 1
    return count


def global_shape(gname: str, arch: ModelArch) -> tuple[int, ...]:
    h, hd = arch.hidden_size, arch.head_dim
    tail = gname.split(".", 3)[-1] if gname.startswith("decoder.layers.") else gname
    shapes = {
        "embedding.word_embeddings.weight": (arch.vocab_size, h),
        "output_layer.weight": (arch.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": ((arch.num_heads + 2 * arch.num_kv_heads) * hd, h),
        "self_attention.linear_qkv.bias": ((arch.num_heads + 2 * arch.num_kv_heads) * hd,),
        "self_attention.linear_proj.weight": (h, arch.num_heads * hd),
        "mlp.linear_fc1.weight": (2 * arch.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, arch.ffn_hidden_size),
    }
    return shapes[tail]


def _owner_stage(gname: str, arch: ModelArch, pp: int) -> int:
    if gname.startswith("embedding."):
        return 0
    if gname.startswith("decoder.layers."):
        return int(gname.split(".")[2]) // (arch.num_layers // pp)
    return pp - 1


@torch.no_grad()
def iter_full_mcore_weights(model, arch: ModelArch | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical global Megatron name, full TP=1 tensor) on every rank, one at a time."""
    from megatron.core import parallel_state as mpu

    m = unwrap(model)
    arch = arch or m.arch
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    my_stage = mpu.get_pipeline_model_parallel_rank()
    local = {g: p for _, g, p in iter_local_params(m)}
    device = next(m.parameters()).device
    # Receivers must allocate exactly the owner's dtype: norms may stay float32 in a bf16
    # model, and NCCL does not check sizes (a byte-count mismatch hangs; gloo hid this).
    dtypes = _pp_param_dtypes(local) if pp > 1 else {}
    for gname in global_param_names(arch):
        rule, _ = find_rule(gname)
        owner = _owner_stage(gname, arch, pp)
        full = None
        if my_stage == owner:
            shard = local[gname].detach()
            if tp > 1 and rule.tp_dim is not None:
                parts = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(parts, shard.contiguous(), group=mpu.get_tensor_model_parallel_group())
                full = tp_unshard(rule, parts, arch)
            else:
                full = tp_unshard(rule, [shard], arch)
        if pp > 1:
            if full is None:
                full = torch.empty(global_shape(gname, arch), dtype=dtypes[gname], device=device)
            group = mpu.get_pipeline_model_parallel_group()
            src = dist.get_process_group_ranks(group)[owner]
            full = full.contiguous()
            dist.broadcast(full, src=src, group=group)
        yield gname, full


def _pp_param_dtypes(local: dict) -> dict:
    """{global name: dtype} over every pipeline stage (one small object all-gather)."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_pipeline_model_parallel_group()
    mine = {g: str(p.dtype).removeprefix("torch.") for g, p in local.items()}
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return {g: getattr(torch, d) for part in parts for g, d in part.items()}


def iter_hf_weights(model, arch: ModelArch | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors (e.g. for export or rollout weight sync), one at a time."""
    m = unwrap(model)
    arch = arch or m.arch
    for gname, full in iter_full_mcore_weights(m, arch):
        rule, layer = find_rule(gname)
        for hname, t in zip(hf_names(rule, layer), split_to_hf(rule, full, arch)):
            yield hname, t


# --- Megatron distributed checkpoints ----------------------------------------------

def save_mcore_checkpoint(model, out_dir, arch: ModelArch | None = None, extra_meta: dict | None = None) -> None:
    from megatron.core import dist_checkpointing

    m = unwrap(model)
    arch = arch or m.arch
    out = Path(out_dir)
    (out / "model").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(m.sharded_state_dict(), str(out / "model"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = {"format": MCORE_FORMAT, "arch": arch.to_dict(), **(extra_meta or {})}
        with open(out / MCORE_META, "w") as f:
            json.dump(meta, f, indent=2)
    if dist.is_initialized():
        dist.barrier()


def load_mcore_checkpoint(model, ckpt_dir) -> None:
    from megatron.core import dist_checkpointing

    m = unwrap(model)
    d = Path(ckpt_dir) / "model"
    if not d.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no 'model' folder (not a megatron-rl Megatron checkpoint)")
    state = dist_checkpointing.load(m.sharded_state_dict(), str(d))
    m.load_state_dict(state, strict=False)


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


def load_checkpoint(path: str | os.PathLike, dtype="float32", layer_spec: str = "auto", **build_kwargs):
    """Build the GPTModel chunk for this rank and load weights from `path`.

    Call `megatron_rl.parallel.init_distributed(...)` first.
    """
    from megatron_rl.models.provider import build_model

    kind, arch = read_checkpoint_arch(path)
    model = build_model(arch, dtype=dtype, layer_spec=layer_spec, **build_kwargs)
    if kind == "hf":
        load_hf_weights(model, path, arch)
    else:
        load_mcore_checkpoint(model, path)
    return model
