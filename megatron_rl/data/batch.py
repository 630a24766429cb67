"""The one batch type that flows through a training step.

A `Batch` is a dict of tensors that share their leading (sample) dimension plus a
list of per-sample python dicts (ids, ground truth, agent turn records, ...).
Nothing else rides along: options belong in the typed config, not in the batch.

Tensor names used across the package (shapes: B samples, P prompt, R response):
  prompt_ids [B, P] long, left-padded      prompt_mask [B, P] long (1 = real token)
  response_ids [B, R] long, right-padded   response_mask [B, R] float (loss mask)
  rollout_logprob / old_logprob / ref_logprob [B, R] float
  token_rewards, advantages, returns, values, token_weights [B, R] float
  info_mask [B, R] float (1 = injected by a tool, never trained on)
The loss mask stays floating point end to end: fractional token weights must survive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self._infer_len()
        for name, t in self.tensors.items():
            if t.shape[0] != n:
                raise ValueError(f"Batch tensor '{name}' has leading size {t.shape[0]}, expected {n}")
        if self.samples and len(self.samples) != n:
            raise ValueError(f"Batch has {len(self.samples)} sample records for {n} rows")
        if not self.samples:
            self.samples = [{} for _ in range(n)]

    def _infer_len(self) -> int:
        if self.tensors:
            return next(iter(self.tensors.values())).shape[0]
        return len(self.samples)

    def __len__(self) -> int:
        return self._infer_len()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"Batch has no tensor '{name}'; it has {sorted(self.tensors)}") from None

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if self.tensors and value.shape[0] != len(self):
            raise ValueError(f"tensor '{name}' has leading size {value.shape[0]}, batch has {len(self)}")
        self.tensors[name] = value

    def get(self, name: str, default=None):
        return self.tensors.get(name, default)

    def field(self, key: str) -> list[Any]:
        """A per-sample python field as a list (KeyError names the sample)."""
        out = []
        for i, s in enumerate(self.samples):
            if key not in s:
                raise KeyError(f"sample {i} ({s.get('uid', '?')}) has no field '{key}'")
            out.append(s[key])
        return out

    def select(self, index: Sequence[int] | torch.Tensor) -> "Batch":
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch({k: v[idx] for k, v in self.tensors.items()},
                     [dict(self.samples[i]) for i in idx.tolist()])

    def repeat_interleave(self, n: int) -> "Batch":
        """Each row repeated n times in place (rows of one prompt stay adjacent)."""
        idx = torch.arange(len(self)).repeat_interleave(n)
        return self.select(idx)

    def split(self, size: int) -> list["Batch"]:
        return [self.select(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, self.samples)

    @staticmethod
    def concat(batches: Iterable["Batch"], pad_values: dict[str, float] | None = None) -> "Batch":
        """Concatenate along samples; tensors of different widths are right-padded
        (prompt tensors are left-padded) with `pad_values[name]` or 0."""
        batches = list(batches)
        pad_values = pad_values or {}
        names = list(batches[0].tensors)
        out = {}
        for name in names:
            parts = [b[name] for b in batches]
            if parts[0].dim() >= 2:
                width = max(p.shape[1] for p in parts)
                left = name.startswith("prompt")
                fill = pad_values.get(name, 0)
                parts = [_pad_dim1(p, width, fill, left) for p in parts]
            out[name] = torch.cat(parts, 0)
        samples = [s for b in batches for s in b.samples]
        return Batch(out, samples)


def _pad_dim1(t: torch.Tensor, width: int, fill: float, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = t.new_full((t.shape[0], extra, *t.shape[2:]), fill)
    return torch.cat([pad, t] if left else [t, pad], 1)
