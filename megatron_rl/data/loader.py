"""What the trainer calls: `PromptLoader(cfg, tokenizer)`, then `next_batch()` each step,
`val_batches()` at validation and `state_dict()` in checkpoints.

Loading is synchronous on purpose: tokenizing a few hundred prompts takes
milliseconds next to a rollout, and a prefetching worker would make the saved
position run ahead of what was trained on.
"""
from __future__ import annotations

from typing import Any, Iterator

from megatron_rl.data.batch import Batch
from megatron_rl.data.collate import collate_prompts, pad_token_id
from megatron_rl.data.config import DataConfig
from megatron_rl.data.dataset import RLDataset
from megatron_rl.data.sampler import ResumableSampler
from megatron_rl.parallel.data_parallel import dp_rank_size, shard_for_dp


class PromptLoader:
    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg = cfg
        self.pad_id = pad_token_id(tokenizer)
        self.train = RLDataset(cfg.train_files, tokenizer, cfg)
        self.val = RLDataset(cfg.val_files, tokenizer, cfg) if cfg.val_files else None
        self.sampler = ResumableSampler(len(self.train), cfg.train_batch_size, cfg.shuffle, cfg.seed,
                                        cfg.drop_last)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def next_batch(self) -> Batch:
        """This data-parallel rank's share of the next global batch (all of it at DP=1)."""
        idx = shard_for_dp(self.sampler.next_batch(), "data.train_batch_size")
        return collate_prompts([self.train[i] for i in idx], self.pad_id)

    def val_batches(self) -> Iterator[Batch]:
        """This DP rank's validation prompts (a round-robin share; `dp_mean` joins the scores)."""
        if self.val is None:
            return
        rank, size = dp_rank_size()
        mine = list(range(rank, len(self.val), size))
        step = self.cfg.val_batch_size or len(mine) or 1
        for start in range(0, len(mine), step):
            yield collate_prompts([self.val[i] for i in mine[start:start + step]], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
