"""Loading a stream of full HF-named tensors into a (possibly TP/PP-sharded)
Megatron model (one chunk or this rank's `model.vpp` chunk list), with the same
mapping table as checkpoint conversion.

Parts of fused parameters (q/k/v, gate/up) may arrive in any order; a Megatron
parameter is written once all its HF parts have arrived. Tensors this chunk does not
own (other pipeline stages) are skipped. Pending parts are keyed by global parameter
name: local names repeat across virtual-pipeline chunks.
"""
from __future__ import annotations

from typing import Iterable

import torch

from megatron_rl.models.loading import hf_source_name, as_chunks, iter_local_params
from megatron_rl.models.weight_mapping import find_rule, fuse_hf, hf_names, tp_shard


@torch.no_grad()
def load_named_hf_tensors(model, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    from megatron.core import parallel_state as mpu

    chunks = as_chunks(model)
    arch = chunks[0].arch
    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    wanted: dict[str, list[tuple[str, torch.nn.Parameter, object, int | None]]] = {}
    for _, gname, p in iter_local_params(chunks):
        rule, layer = find_rule(hf_source_name(gname, arch), arch)
        for h in hf_names(rule, layer):
            wanted.setdefault(h, []).append((gname, p, rule, layer))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    written = 0
    for name, tensor in named:
        for key, p, rule, layer in wanted.get(name, []):
            parts = pending.setdefault(key, {})
            parts[name] = tensor
            needed = hf_names(rule, layer)
            if all(n in parts for n in needed):
                full = fuse_hf(rule, [parts[n] for n in needed], arch)
                p.copy_(tp_shard(rule, full.to(p.device), rank, tp, arch).to(p.dtype))
                del pending[key]
                written += 1
    if pending:
        raise ValueError(f"weight update incomplete: missing parts for {sorted(pending)[:5]}")
    return written
