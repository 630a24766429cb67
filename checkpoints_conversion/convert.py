"""HF safetensors <-> Megatron-Core distributed checkpoints.

hf-to-mcore: `tp*pp*ep` CPU processes (gloo) each build their model chunk, read only the
HF tensors it needs (memory-mapped safetensors, one at a time) and keep only their
shard, then write a Megatron `dist_checkpointing` checkpoint together. The result
loads at any TP/PP/EP. Host memory holds the model once, split over the processes,
except that under `--ep N` (mixture-of-experts checkpoints: each of the N expert-parallel
ranks holds num_experts / N experts, split over `--etp` ranks) the dense weights are
replicated on the N data-parallel ranks that EP is carved from.

mcore-to-hf: one process loads the checkpoint at TP=1/PP=1 and streams tensors to
safetensors shards one parameter at a time (never a second full copy).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megatron_rl.models.hf_config import arch_from_hf_config, arch_to_hf_config
from megatron_rl.models.hf_io import copy_tokenizer_files

HF_CONFIG_COPY = "hf_config.json"


def _progress(total, desc, enabled=True):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _hf_to_mcore_worker(rank, world, port, hf_dir, out_dir, tp, pp, dtype, ep=1, etp=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from megatron_rl.models.loading import iter_local_params, save_mcore_checkpoint
    from megatron_rl.models.provider import build_model
    from megatron_rl.models.hf_io import HFTensorReader
    from megatron_rl.models.loading import load_hf_weights
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp, ep=ep, etp=etp, backend="gloo")
    arch = arch_from_hf_config(hf_dir)
    model = build_model(arch, dtype=dtype, layer_spec="local")
    reader = HFTensorReader(hf_dir)
    n = sum(1 for _ in iter_local_params(model))
    bar = _progress(n, f"hf-to-mcore (rank {rank} of {world})", enabled=(rank == 0))
    load_hf_weights(model, reader, arch)
    bar.update(n)
    bar.close()
    save_mcore_checkpoint(model, out_dir, arch, extra_meta={"source": str(hf_dir), "saved_tp": tp, "saved_pp": pp,
                                                            "saved_ep": ep})
    destroy_distributed()


def hf_to_mcore(hf_dir, out_dir, tp: int = 1, pp: int = 1, dtype: str = "float32", ep: int = 1,
                etp: int | None = None) -> Path:
    hf_dir, out = Path(hf_dir), Path(out_dir)
    arch = arch_from_hf_config(hf_dir)          # fails early, naming the bad field
    if arch.num_layers % pp:
        raise ValueError(f"--pp {pp} does not divide num_hidden_layers={arch.num_layers}")
    if arch.num_kv_heads % tp:
        raise ValueError(f"--tp {tp} does not divide num_key_value_heads={arch.num_kv_heads}")
    etp_ = tp if etp is None else etp
    if ep > 1 and not arch.is_moe:
        raise ValueError(f"--ep {ep}: {hf_dir} is a dense model (no experts); use --ep 1")
    if arch.is_moe and arch.num_experts % ep:
        raise ValueError(f"--ep {ep} does not divide num_experts={arch.num_experts}")
    if tp % etp_:           # the tp*pp*ep processes must divide by Megatron's etp*ep*pp expert grid
        raise ValueError(f"--etp {etp_} does not divide --tp {tp}")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    world = tp * pp * ep
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_hf_to_mcore_worker, args=(world, port, str(hf_dir), str(tmp), tp, pp, dtype, ep, etp),
                       nprocs=world, start_method="spawn", join=True)
    copy_tokenizer_files(hf_dir, tmp)
    shutil.copy2(hf_dir / "config.json", tmp / HF_CONFIG_COPY)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def mcore_to_hf(mcore_dir, out_dir, dtype: str | None = None, max_shard_gb: float = 2.0) -> Path:
    from megatron_rl.models.hf_io import HFShardedWriter
    from megatron_rl.models.loading import iter_hf_weights, load_mcore_checkpoint, read_checkpoint_arch
    from megatron_rl.models.provider import build_model
    from megatron_rl.models.weight_mapping import find_rule, global_param_names
    from megatron_rl.models.hf_config import parse_dtype
    from megatron_rl.parallel import init_distributed

    mcore_dir, out = Path(mcore_dir), Path(out_dir)
    kind, arch = read_checkpoint_arch(mcore_dir)
    if kind != "mcore":
        raise ValueError(f"{mcore_dir}: not a megatron-rl Megatron checkpoint (it looks like an HF directory)")
    init_distributed(tp=1, pp=1, backend="gloo")
    model = build_model(arch, dtype=dtype or "float32", layer_spec="local")
    load_mcore_checkpoint(model, mcore_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = HFShardedWriter(tmp, int(max_shard_gb * 1024**3))
    n_hf = sum(len(find_rule(g, arch)[0].hf) for g in global_param_names(arch))
    bar = _progress(n_hf, "mcore-to-hf")
    for name, t in iter_hf_weights(model, arch):
        writer.add(name, t.to(parse_dtype(dtype)) if dtype else t)
        bar.update(1)
    bar.close()
    writer.close()
    src_cfg = mcore_dir / HF_CONFIG_COPY
    if src_cfg.exists():
        cfg = json.loads(src_cfg.read_text())
    else:
        cfg = arch_to_hf_config(arch)
    if dtype:
        cfg["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    copy_tokenizer_files(mcore_dir, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main_hf_to_mcore(args) -> None:
    t0 = time.time()
    out = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, ep=args.ep, etp=args.etp)
    print(f"wrote Megatron checkpoint {out} (saved at tp={args.tp} pp={args.pp} ep={args.ep}, loadable at any) "
          f"in {time.time() - t0:.1f}s")


def main_mcore_to_hf(args) -> None:
    t0 = time.time()
    out = mcore_to_hf(args.mcore_dir, args.out, dtype=args.dtype)
    print(f"wrote HF checkpoint {out} in {time.time() - t0:.1f}s")
