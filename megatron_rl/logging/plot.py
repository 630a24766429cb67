"""`plot_run(run_dir)`: reward and KL curves of a run as a PNG, from metrics.jsonl.

Uses matplotlib's Agg canvas directly, so it never touches the caller's backend.
Where a resumed run logged a step twice, the later record wins.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from megatron_rl.logging.names import KL_KEYS, REWARD_MEAN, VAL_REWARD

log = logging.getLogger(__name__)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl sorted by step, one per step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (was the jsonl sink enabled?)")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # a run killed mid-write leaves a partial line; the resumed run goes on after it
                log.warning("%s:%d: not a JSON record, skipped", path, lineno)
                continue
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    out = Path(out_png) if out_png is not None else Path(run_dir) / "metrics.png"
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_r, ax_kl = fig.subplots(1, 2)
    for key, label, style in ((REWARD_MEAN, "train reward/mean", "-"), (VAL_REWARD, "val/reward", "o--")):
        steps, values = _series(records, key)
        if steps:
            ax_r.plot(steps, values, style, label=label)
    ax_r.set_title("reward")
    ax_r.set_xlabel("step")
    kl_found = False
    for key in KL_KEYS:
        steps, values = _series(records, key)
        if steps:
            ax_kl.plot(steps, values, label=key)
            kl_found = True
    if not kl_found:
        ax_kl.text(0.5, 0.5, "no KL metrics logged", ha="center", va="center", transform=ax_kl.transAxes)
    ax_kl.set_title("KL")
    ax_kl.set_xlabel("step")
    for ax in (ax_r, ax_kl):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
