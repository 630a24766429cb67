"""The `logging:` config section."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CONSOLE_KEYS = ["reward/mean", "val/reward", "actor/pg_loss", "actor/kl_loss", "actor/entropy",
                        "actor/grad_norm", "response_length/mean", "timing/step"]


@dataclass
class LoggingConfig:
    # Where metrics go: any of console, jsonl, tensorboard, wandb. Only rank 0 writes.
    # jsonl appends to RUN_DIR/metrics.jsonl (a resumed run continues the file);
    # tensorboard writes RUN_DIR/tensorboard unless `tensorboard_dir` is set.
    sinks: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    run_dir: str = "runs/default"
    project: str = "megatron-rl"
    experiment_name: str = "default"

    # Console: one line per step with these metrics (those present), under a tqdm bar.
    console_keys: list[str] = field(default_factory=lambda: list(DEFAULT_CONSOLE_KEYS))
    progress_bar: bool = True

    tensorboard_dir: str | None = None

    # wandb (needs `pip install wandb`); the run id is kept in RUN_DIR/wandb_id so a
    # resumed run continues the same wandb run.
    wandb_entity: str | None = None
    wandb_mode: str = "online"              # online | offline | disabled
    wandb_tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.sinks, str):
            self.sinks = [self.sinks]
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logging.wandb_mode must be online|offline|disabled, got '{self.wandb_mode}'")
