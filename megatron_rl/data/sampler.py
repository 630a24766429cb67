"""A batch sampler whose position is a small dict, so a resumed run sees exactly the
prompts the interrupted one would have seen next.

The order of epoch `e` is a permutation drawn from `seed + e` alone, so the position
`(epoch, batch_in_epoch)` fully determines what comes next; nothing else needs saving.
Every rank builds the same sampler and so draws the same global batch (SPMD).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


class ResumableSampler:
    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        if num_samples <= 0:
            raise ValueError("ResumableSampler needs at least one sample")
        if drop_last and num_samples < batch_size:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one batch of {batch_size} "
                             f"(lower data.train_batch_size or set data.drop_last=false)")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_in_epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """The next batch of indices; epochs roll over forever (the trainer counts steps)."""
        if self.batch_in_epoch >= len(self):
            self.epoch += 1
            self.batch_in_epoch = 0
        start = self.batch_in_epoch * self.batch_size
        batch = self.order(self.epoch)[start:start + self.batch_size]
        self.batch_in_epoch += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch."""
        while self.batch_in_epoch < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_samples", "batch_size", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler checkpoint has {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}: the resumed order would differ")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
