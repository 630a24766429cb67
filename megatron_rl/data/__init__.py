"""Prompts for RL: JSONL/Parquet datasets, chat templates, truncation, resumable sampling.

Entry point for the trainer: `PromptLoader(DataConfig, tokenizer)`.
"""
from megatron_rl.data.batch import Batch
from megatron_rl.data.collate import collate_prompts, pad_token_id
from megatron_rl.data.config import DataConfig
from megatron_rl.data.dataset import RLDataset
from megatron_rl.data.loader import PromptLoader
from megatron_rl.data.readers import DataError, read_records
from megatron_rl.data.sampler import ResumableSampler

__all__ = ["Batch", "DataConfig", "DataError", "PromptLoader", "RLDataset", "ResumableSampler",
           "collate_prompts", "pad_token_id", "read_records"]
