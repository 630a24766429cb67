"""Run checkpoints: one manager saves every role, the trainer state (step, sampler, KL
controller, ...) and each rank's RNG together, atomically.

Layout of `RUN_DIR/checkpoints/step_N/`: each role writes its own files (the actor: a
Megatron distributed checkpoint, loadable at any TP/PP, plus `rank{r}.pt` with its
optimizer and LR schedule; critic / discriminator: `{name}_rank{r}.pt`; the strength
predictor: `predictor.pt`), `rng_rank{r}.pt` holds each rank's RNG, and
`trainer_state.json` the trainer state. Everything is written into `step_N.tmp` and
renamed when complete, so a crash never leaves a half checkpoint that `resume: auto`
would pick; the last `keep_last` are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_rl.models.loading import load_mcore_checkpoint, save_mcore_checkpoint
from megatron_rl.trainer.roles import Role

LATEST = "latest"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(ckpt_dir: Path, name: str) -> Path:
    """This rank's file of a role that keeps per-rank state (`{name}_rank00003.pt`)."""
    return Path(ckpt_dir) / f"{name}_rank{rank():05d}.pt"


class CheckpointManager:
    """Saves and restores every role plus the trainer state of one run directory."""

    def __init__(self, run_dir, keep_last: int = 2):
        self.root = checkpoint_root(run_dir)
        self.keep_last = keep_last

    def save(self, step: int, roles: Mapping[str, Role], trainer_state: dict) -> Path:
        final, tmp = self.root / f"step_{step:06d}", self.root / f"step_{step:06d}.tmp"
        if rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        for name, role in roles.items():
            role.save_checkpoint(tmp, name)
        rng = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        torch.save(rng, rank_file(tmp, "rng"))
        barrier()
        if rank() == 0:
            publish(self.root, tmp, final, step, trainer_state, self.keep_last)
        barrier()
        return final

    def find(self, resume: str) -> Path | None:
        return find_checkpoint(self.root.parent, resume)

    def restore(self, path: Path, roles: Mapping[str, Role]) -> dict:
        """Load every role and this rank's RNG from `path`; returns the trainer state."""
        for name, role in roles.items():
            role.load_checkpoint(path, name)
        f = rank_file(path, "rng")
        if f.exists():
            rng = torch.load(f, weights_only=True)
            torch.set_rng_state(rng["torch_rng"])
            if torch.cuda.is_available() and "cuda_rng" in rng:
                torch.cuda.set_rng_state(rng["cuda_rng"])
        return json.loads((path / "trainer_state.json").read_text())


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


# --- the actor's files: a Megatron distributed checkpoint + per-rank optimizer -----------

def save_policy(actor, tmp: Path) -> None:
    """The actor's weights as a Megatron distributed checkpoint (any TP/PP can load it)
    and this rank's optimizer + LR schedule as `rank{r}.pt`."""
    save_mcore_checkpoint(actor.chunks, tmp)
    state = {"optimizer": actor.optimizer.state_dict(), "scheduler": actor.scheduler.state_dict()}
    torch.save(state, tmp / f"rank{rank():05d}.pt")


def load_policy(actor, path: Path) -> None:
    load_mcore_checkpoint(actor.chunks, path)
    f = path / f"rank{rank():05d}.pt"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no optimizer state for rank {rank()} (resume needs the same world size)")
    state = torch.load(f, weights_only=False)
    actor.optimizer.load_state_dict(state["optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])
