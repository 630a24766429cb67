"""Disaggregated rollout ranks and asynchronous training (docs/ASYNC.md)."""
