"""Process bodies for the async tests (importable by spawned processes)."""
from __future__ import annotations


def train(rank, world, overrides):
    from megatron_rl.trainer.main import train_main
    assert train_main(None, list(overrides)) == 0
