"""Metrics: sinks (console, jsonl, tensorboard, wandb), phase timers, run plots.

Entry points: `MetricsLogger(LoggingConfig, total_steps=...)`, `plot_run(run_dir)`.
Standard metric names are in `megatron_rl.logging.names`.
"""
from megatron_rl.logging.config import LoggingConfig
from megatron_rl.logging.logger import MetricsLogger, timer
from megatron_rl.logging.plot import plot_run, read_metrics
from megatron_rl.logging.sinks import SINKS, Sink, register_sink

__all__ = ["LoggingConfig", "MetricsLogger", "SINKS", "Sink", "plot_run", "read_metrics", "register_sink", "timer"]
