"""The tiny offline run of tests/trainer, reused by the async tests."""
from tests.trainer.conftest import tiny_run  # noqa: F401  (fixture)
