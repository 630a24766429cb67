"""Run checkpoints: model (Megatron distributed checkpoint, loadable at any TP/PP),
optimizer + LR schedule + RNG per rank, and the trainer state (step, sampler, KL
controller). Written to `step_N.tmp` and renamed when complete, so a crash never
leaves a half checkpoint that `resume: auto` would pick; keeps the last N.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rl.models.loading import load_mcore_checkpoint, save_mcore_checkpoint, unwrap

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir, step: int, actor, trainer_state: dict, keep_last: int = 2,
                    extra_states: dict | None = None) -> Path:
    """Actor (mcore dist-checkpoint + per-rank optimizer/RNG) and `extra_states` (name -> this
    rank's state dict, e.g. critic, discriminator) written into `step_N.tmp`, then published
    together: a crash never leaves a `latest` that lacks one of them."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    save_mcore_checkpoint(actor.model, tmp)
    state = {"optimizer": actor.optimizer.state_dict(), "scheduler": actor.scheduler.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(state, tmp / f"rank{_rank():05d}.pt")
    for name, extra in (extra_states or {}).items():
        torch.save(extra, tmp / f"{name}_rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        publish(root, tmp, final, step, trainer_state, keep_last)
    _barrier()
    return final


def publish(root: Path, tmp: Path, final: Path, step: int, trainer_state: dict, keep_last: int) -> None:
    """Rank 0, once every file is in `tmp`: write the trainer state, rename `tmp` to `final`,
    point `latest` at it (itself tmp + rename) and prune old steps. A crash before the
    rename leaves the previous checkpoint as `latest`."""
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / (LATEST + ".tmp")
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / LATEST)
    _prune(root, keep_last)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))
    for p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(run_dir, resume: str) -> Path | None:
    """`auto`: the latest complete checkpoint of the run, if any; `none`; or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / "trainer_state.json").exists():
            raise FileNotFoundError(f"trainer.resume={resume}: not a complete checkpoint (no trainer_state.json)")
        return p
    root = checkpoint_root(run_dir)
    latest = root / LATEST
    if latest.exists():
        p = root / latest.read_text().strip()
        if (p / "trainer_state.json").exists():
            return p
    return None


def load_checkpoint_into(path: Path, actor) -> dict:
    load_mcore_checkpoint(unwrap(actor.model), path)
    f = path / f"rank{_rank():05d}.pt"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no optimizer state for rank {_rank()} (resume needs the same world size)")
    state = torch.load(f, weights_only=False)
    actor.optimizer.load_state_dict(state["optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
    return json.loads((path / "trainer_state.json").read_text())
