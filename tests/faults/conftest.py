"""Fault-injection fixtures: the tiny offline run of tests/trainer, and fresh fault counters."""
import pytest

from megatron_rl.trainer import faults
from tests.trainer.conftest import tiny_run  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def fresh_fault_counters(monkeypatch):
    """Each test counts its own fault-point visits (faults.py counts per process)."""
    monkeypatch.setattr(faults, "_hits", faults.Counter())
