"""Metric sinks, one class per destination, picked by name from `logging.sinks`.

A sink has `log(metrics: dict[str, float], step: int)` and `close()`; metrics arrive
as plain floats. tensorboard and wandb are imported only when configured.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from megatron_rl.logging.config import LoggingConfig

SINKS: dict[str, Callable[..., "Sink"]] = {}


def register_sink(name: str):
    def decorator(cls):
        SINKS[name] = cls
        return cls
    return decorator


class Sink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _fmt(value: float) -> str:
    return f"{value:.4g}"


@register_sink("console")
class ConsoleSink(Sink):
    """A tqdm bar over the steps and one line per step with the key metrics."""

    def __init__(self, cfg: LoggingConfig, total_steps: int | None = None, start_step: int = 0, **_):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.keys = cfg.console_keys
        self.total = total_steps
        self.bar = tqdm(total=total_steps, initial=start_step, desc=cfg.experiment_name, unit="step",
                        dynamic_ncols=True) if cfg.progress_bar else None

    def format_line(self, metrics: dict[str, float], step: int) -> str:
        head = f"step {step}" + (f"/{self.total}" if self.total else "")
        parts = [f"{k} {_fmt(metrics[k])}" for k in self.keys if k in metrics]
        return " | ".join([head, *parts])

    def log(self, metrics: dict[str, float], step: int) -> None:
        line = self.format_line(metrics, step)
        if self.bar is None:
            print(line, flush=True)
            return
        self._tqdm.write(line)
        self.bar.update(max(0, step - self.bar.n))
        if "reward/mean" in metrics:
            self.bar.set_postfix({"reward": _fmt(metrics["reward/mean"])}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@register_sink("jsonl")
class JsonlSink(Sink):
    """RUN_DIR/metrics.jsonl, one object per step (`step`, `time`, metrics), appended
    and flushed per line so a crash loses nothing and a resumed run continues the file."""

    def __init__(self, cfg: LoggingConfig, **_):
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _ends_mid_line(self.path):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")              # a killed run's partial last line stays on its own
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


@register_sink("tensorboard")
class TensorBoardSink(Sink):
    def __init__(self, cfg: LoggingConfig, **_):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("logging.sinks includes 'tensorboard' but it is not installed: "
                              "pip install 'megatron-rl[logging]' (or remove it from logging.sinks)") from e
        self.writer = SummaryWriter(log_dir=cfg.tensorboard_dir or str(Path(cfg.run_dir) / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@register_sink("wandb")
class WandbSink(Sink):
    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any] | None = None, **_):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logging.sinks includes 'wandb' but wandb is not installed: "
                              "pip install 'megatron-rl[wandb]' (or remove it from logging.sinks)") from e
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, name=cfg.experiment_name, entity=cfg.wandb_entity,
                              mode=cfg.wandb_mode, tags=cfg.wandb_tags or None, config=run_config,
                              dir=str(run_dir), id=run_id, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
