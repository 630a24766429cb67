"""Streaming HF safetensors reading and writing (one tensor in memory at a time)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "added_tokens.json",
                   # vision-language checkpoints: the image / video processors
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


class HFTensorReader:
    """Lazily reads named tensors from an HF checkpoint directory (sharded or not)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not (self.dir / "config.json").exists():
            raise FileNotFoundError(f"{self.dir}: no config.json (not an HF checkpoint directory)")
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            with open(index) as f:
                self.where = {k: self.dir / v for k, v in json.load(f)["weight_map"].items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.dir}: no *.safetensors files (only safetensors checkpoints are read)")
            self.where = {}
            for fp in files:
                with safe_open(fp, "pt") as f:
                    for k in f.keys():
                        self.where[k] = fp
        self._handles = {}
        from megatron_rl.models.vl.config import hub_tensor_names   # VL checkpoints under module names
        self.aliases = hub_tensor_names(self.where)

    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.where

    def _handle(self, fp):
        if fp not in self._handles:
            self._handles[fp] = safe_open(fp, "pt")
        return self._handles[fp]

    def get(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if name not in self.where:
            raise KeyError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        return self._handle(self.where[name]).get_tensor(name)


class HFShardedWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, plus the index."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        idx = len(self.shards) + 1
        tmp_name = f"shard-{idx:05d}.safetensors"
        save_file(self.pending, str(self.out / tmp_name), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / "shard-00001.safetensors", self.out / "model.safetensors")
            return
        for i, names in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.safetensors", self.out / final)
            for k in names:
                self.weight_map[k] = final
        with open(self.out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.exists():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied


def write_safetensors_stream(out_dir, named: Iterable[tuple[str, torch.Tensor]], max_shard_bytes=2 * 1024**3):
    w = HFShardedWriter(out_dir, max_shard_bytes)
    for name, t in named:
        w.add(name, t)
    w.close()
