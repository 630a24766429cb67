"""Run checkpoints: one manager saves every role, the trainer state (step, sampler, KL
controller, ...) and each rank's RNG together, atomically and verifiably.

Layout of `RUN_DIR/checkpoints/step_N/`: each role writes its own files (the actor: one
Megatron distributed checkpoint holding its weights, optimizer state and LR schedule,
loadable at any DP/TP/PP; critic / discriminator: the same under `{name}/`; the strength
predictor: `predictor.pt`), `rng_rank{r}.pt` holds each rank's RNG, `trainer_state.json`
the trainer state (the sampler position is global: prompts consumed, not per DP rank) and
`manifest.json` (trainer/manifest.py) every file's size and CRC32 and the run plan.
Everything is written into `step_N.tmp`, fsync'ed, the manifest written last,
and the directory renamed when complete; `resume: auto` takes the newest checkpoint that
passes its manifest check and names the file of each one it skips. The last `keep_last`
are kept (>= 2 leaves a fallback when the newest is damaged). Under `trainer.async_save` the
roles' dist-checkpoint files are written in the background (trainer/async_save.py) and the
manifest + rename wait until that write is finalized.

Loading never unpickles arbitrary objects: `.pt` files hold tensors, primitives and
containers only and are read with `torch.load(weights_only=True)`; small state is JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_rl.models.loading import load_mcore_checkpoint, save_mcore_checkpoint
from megatron_rl.trainer.async_save import AsyncSaver, async_requested, collect_request
from megatron_rl.trainer.faults import disk_full_now, fault_point
from megatron_rl.trainer.manifest import CheckpointCorrupt, checksum_files, fsync_dir, verify_checkpoint, \
    write_manifest
from megatron_rl.trainer.roles import Role

LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d+)")


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


def load_tensors(path: Path) -> dict:
    """A `.pt` file of tensors / primitives / containers; refuses pickled objects (weights_only)."""
    return torch.load(path, weights_only=True, map_location="cpu")


class CheckpointManager:
    """Saves and restores every role plus the trainer state of one run directory. `plan`: the
    run plan's `to_dict()`, recorded in each manifest. `async_save` (`trainer.async_save`): the
    roles' dist-checkpoint files are written by a background process (trainer/async_save.py);
    the save is verified and published (manifest, rename) when it is finalized: at the next
    save, `poll()` once the write is done, `finalize()` (end of the run) or before a resume."""

    def __init__(self, run_dir, keep_last: int = 2, plan: dict | None = None, async_save: bool = False):
        self.root = checkpoint_root(run_dir)
        self.keep_last = keep_last
        self.plan = plan
        self.saver = AsyncSaver() if async_save else None

    def save(self, step: int, roles: Mapping[str, Role], trainer_state: dict) -> Path:
        """Synchronous: returns once `step_N` is published. Asynchronous: once the write started
        (`step_N` appears when it is finalized)."""
        self.finalize()                             # one save in flight
        final, tmp = self.root / f"step_{step:06d}", self.root / f"step_{step:06d}.tmp"
        if rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        with self._guard(step, tmp):
            with self.saver.collect() if self.saver is not None else contextlib.nullcontext():
                for name, role in roles.items():
                    role.save_checkpoint(tmp, name)
            rng = {"torch_rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda_rng"] = torch.cuda.get_rng_state()
            torch.save(rng, rank_file(tmp, "rng"))
            if rank() == 0:
                (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
            barrier()
        if self.saver is None:
            self._complete(step, tmp, final)
        else:
            self.saver.schedule(lambda megatron_fns: self._complete(step, tmp, final, megatron_fns))
            fault_point("save_async")               # the background write has started
        return final

    def _complete(self, step: int, tmp: Path, final: Path, megatron_fns=()) -> None:
        """Every file of `tmp` written (after an async write: once Megatron's own finalize steps
        ran): checksum + fsync them, the manifest last, publish."""
        with self._guard(step, tmp):
            for fn in megatron_fns:
                fn()
            fault_point("save_write")
            disk_full_now(str(tmp))
            files = checksum_files(tmp)             # collective; fsyncs every file
            if rank() == 0:
                write_manifest(tmp, files, step, self.plan)
        if rank() == 0:
            publish(self.root, tmp, final, self.keep_last)
        barrier()
        fault_point("saved")

    @contextlib.contextmanager
    def _guard(self, step: int, tmp: Path):
        """A failed save (a full disk, a writer that failed) frees what it took; the last one stays."""
        from megatron.core.dist_checkpointing.core import CheckpointingException

        try:
            yield
        except (OSError, CheckpointingException) as e:
            if rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(getattr(e, "errno", None), f"checkpoint save of step {step} into {tmp} failed ({e}); "
                                                     f"the previous checkpoint is intact") from e

    def finalize(self) -> None:
        """Complete the asynchronous save in flight, if any (collective)."""
        if self.saver is not None:
            self.saver.finalize()

    def poll(self) -> None:
        """Complete the asynchronous save in flight if its write has finished (collective)."""
        if self.saver is not None:
            self.saver.poll()

    def find(self, resume: str) -> Path | None:
        self.finalize()
        return find_checkpoint(self.root.parent, resume)

    def restore(self, path: Path, roles: Mapping[str, Role]) -> dict:
        """Load every role and this rank's RNG from `path`; returns the trainer state."""
        self.finalize()
        for name, role in roles.items():
            role.load_checkpoint(path, name)
        f = rank_file(path, "rng")
        if f.exists():
            rng = load_tensors(f)
            torch.set_rng_state(rng["torch_rng"])
            if torch.cuda.is_available() and "cuda_rng" in rng:
                torch.cuda.set_rng_state(rng["cuda_rng"])
        return json.loads((path / "trainer_state.json").read_text())


def publish(root: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0, once `tmp` is complete (manifest included): rename it to `final`, point `latest`
    at it and prune old steps. A crash before the rename leaves the previous checkpoint in
    place. Re-saving an existing step first moves `latest` to the newest other checkpoint, so
    `latest` never names a directory that is being deleted."""
    doomed = final.with_name(final.name + ".old")
    if final.exists():
        if _read_latest(root) == final.name:
            others = [p for p in complete_steps(root) if p != final]
            _point_latest(root, others[0].name if others else None)
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(final, doomed)
    os.replace(tmp, final)
    fsync_dir(root)
    fault_point("save_renamed")
    _point_latest(root, final.name)
    shutil.rmtree(doomed, ignore_errors=True)
    _prune(root, keep_last)


def _read_latest(root: Path) -> str | None:
    p = root / LATEST
    return p.read_text().strip() if p.exists() else None


def _point_latest(root: Path, name: str | None) -> None:
    """`latest` := name (tmp + fsync + rename), or removed when None."""
    if name is None:
        (root / LATEST).unlink(missing_ok=True)
        return
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def complete_steps(root: Path) -> list[Path]:
    """Renamed (complete-looking) `step_N` directories, newest first; `.tmp` / `.old` excluded."""
    if not root.exists():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(steps, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)), reverse=True)


def _prune(root: Path, keep_last: int) -> None:
    for p in complete_steps(root)[keep_last:] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step_*.old"):
        shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(run_dir, resume: str) -> Path | None:
    """`none`; a path (it must pass its manifest check); or `auto`: the newest checkpoint of
    the run that passes its check, each skipped one reported with the file that failed.
    Collective when distributed (ranks share the checksum work)."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / "trainer_state.json").exists():
            raise FileNotFoundError(f"trainer.resume={resume}: not a complete checkpoint (no trainer_state.json)")
        verify_checkpoint(p)
        return p
    root = checkpoint_root(run_dir)
    skipped = []
    for p in complete_steps(root):
        try:
            verify_checkpoint(p)
        except CheckpointCorrupt as e:
            skipped.append(str(e))
            if rank() == 0:
                print(f"checkpoint {p.name} skipped: {e}", flush=True)
            continue
        return p
    if skipped:
        raise CheckpointCorrupt(f"trainer.resume=auto: every checkpoint under {root} failed its check "
                                f"({'; '.join(skipped)}); set trainer.resume=none to start over")
    return None


# --- the actor's files: weights, optimizer and LR schedule in one Megatron distributed checkpoint --

ACTOR_STATE = "megatron_rl.actor.sharded.v1"    # `actor_state` in megatron_rl.json: optimizer in the dist-ckpt
# Megatron's fully reshardable optimizer layout: each parameter's state is a sharded tensor keyed by
# the parameter's own key (`optimizer.state.exp_avg.<model key>`), so the checkpoint loads at any
# DP/TP/PP. The non-distributed optimizers ignore the metadata (their layout is always this one).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space",
                      "chained_optim_avoid_prefix": True}


def save_policy(actor, tmp: Path) -> None:
    """The actor's weights, optimizer state (Adam moments, fp32 master params, the step) and LR
    schedule as one Megatron distributed checkpoint (`model/`): `save_trained`."""
    save_trained(actor.chunks, actor.optimizer, actor.scheduler, tmp)


def load_policy(actor, path: Path) -> None:
    """Weights at any layout; the optimizer and schedule from the same checkpoint (any DP/TP/PP),
    or from the per-rank files of a checkpoint written before that (`_load_legacy_optimizer`)."""
    if actor.optimizer is not None and actor_state_format(path) != ACTOR_STATE:
        load_mcore_checkpoint(actor.chunks, path)
        _load_legacy_optimizer(actor, path)
        return
    load_trained(actor.chunks, actor.optimizer, actor.scheduler, path)


def save_trained(chunks, optimizer, scheduler, out: Path) -> None:
    """A trained role (actor, critic, GAD discriminator: trunk + value head) as one Megatron
    distributed checkpoint under `out` (`model/` + `megatron_rl.json`) through Megatron's own
    `optimizer.sharded_state_dict`: weights, optimizer state and LR schedule resumable at any
    DP/TP/PP layout, the distributed optimizer included. The schedule and the optimizer's
    hyperparameters go to its common state. Call on every rank."""
    extra = None
    if optimizer is not None:
        def extra(model_sd: dict) -> dict:
            return {"optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}
    request = save_mcore_checkpoint(chunks, out, extra_meta={"actor_state": ACTOR_STATE}, extra_state=extra,
                                    async_save=async_requested())
    if request is not None:
        collect_request(request)


def load_trained(chunks, optimizer, scheduler, path: Path) -> None:
    """Inverse of `save_trained`, at any DP/TP/PP layout. Call on every rank."""
    from megatron.core import dist_checkpointing

    from megatron_rl.models.loading import sharded_model_state_dict

    load_mcore_checkpoint(chunks, path)
    if optimizer is None:
        return
    opt_sd = optimizer.sharded_state_dict(sharded_model_state_dict(chunks), is_loading=True,
                                          metadata=OPTIMIZER_METADATA)
    state = dist_checkpointing.load({"optimizer": opt_sd}, str(Path(path) / "model"))
    if "scheduler" not in state:
        raise KeyError(f"{Path(path) / 'model'}: the checkpoint's common state has no LR schedule ('scheduler')")
    with torch.no_grad():              # the distributed optimizer copies into fp32 master params (leaves)
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])


def save_value_model(role, ckpt_dir: Path, name: str) -> None:
    """Critic / GAD discriminator: `save_trained` into `ckpt_dir/name/` (elastic like the actor)."""
    save_trained([role.ddp], role.optimizer, role.scheduler, Path(ckpt_dir) / name)


def load_value_model(role, ckpt_dir: Path, name: str) -> None:
    """`ckpt_dir/name/` at any layout, or the per-rank `{name}_rank{r}.pt` of a checkpoint written
    before value models joined the dist-checkpoint (those resume only at the world size that wrote
    them)."""
    from megatron_rl.models.loading import MCORE_META

    d = Path(ckpt_dir) / name
    if (d / MCORE_META).exists():
        load_trained([role.ddp], role.optimizer, role.scheduler, d)
        return
    f = rank_file(ckpt_dir, name)
    if not f.exists():
        raise FileNotFoundError(f"{d / MCORE_META}: checkpoint has no {name} state (saved by a run without "
                                f"this role?), nor an older per-rank file {f.name} (those resume only at the "
                                f"world size that wrote them)")
    role.load_state_dict(load_tensors(f))


def actor_state_format(path: Path) -> str | None:
    """How the actor's optimizer was saved: ACTOR_STATE, or None for the per-rank files of older
    checkpoints (no `actor_state` in `megatron_rl.json`)."""
    from megatron_rl.models.loading import MCORE_META

    meta = Path(path) / MCORE_META
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: missing (not a megatron-rl checkpoint of the actor)")
    return json.loads(meta.read_text()).get("actor_state")


def read_policy_state(path: Path) -> dict:
    """A saved actor's state as plain full tensors, for inspection in one process (tests, tools):
    `{"tensors": {sharded key: tensor}}` (weights, `optimizer.state.exp_avg.<key>`, ...) and its
    common state (`optimizer` hyperparameters and `common_step`, `scheduler`)."""
    from megatron.core import dist_checkpointing

    d = str(Path(path) / "model")
    return {"tensors": dist_checkpointing.load_plain_tensors(d), **dist_checkpointing.load_common_state_dict(d)}


def _load_legacy_optimizer(actor, path: Path) -> None:
    """Checkpoints written before the optimizer joined the dist-checkpoint: this rank's
    `rank{r}.pt` (+ `distopt_tp*_pp*.pt` under the distributed optimizer); they resume only at
    the world size and layout that wrote them."""
    f = path / f"rank{rank():05d}.pt"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no optimizer state for rank {rank()}: {path} is an older checkpoint "
                                f"(per-rank optimizer files), which resumes only at the world size that wrote "
                                f"it; checkpoints written now resume at any DP/TP/PP")
    state = load_tensors(f)
    actor.optimizer.load_state_dict(state["optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])
    if uses_distributed_optimizer(actor.optimizer):
        param_state = path / distributed_optimizer_file()
        if not param_state.exists():
            raise FileNotFoundError(f"{param_state}: no distributed-optimizer parameter state (fp32 master "
                                    f"params, Adam moments); the checkpoint was written without it")
        load_distributed_parameter_state(actor.optimizer, param_state)


def load_distributed_parameter_state(optimizer, path: Path) -> None:
    """`optimizer.load_parameter_state(path)`, working around Megatron-Core 0.16.1 with torch's
    Adam (no TE / Apex optimizer): `load_state_dict` leaves a per-parameter `step` tensor in the
    inner optimizer's state, which `load_parameter_state` then expects in the file (KeyError
    'step'; the file holds param / exp_avg / exp_avg_sq). `step` is set aside for the call."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    held = [(st, st.pop("step")) for o in parts if getattr(o, "optimizer", None) is not None
            for st in o.optimizer.state.values() if "step" in st]
    try:
        with torch.no_grad():          # it copies into the fp32 master params (leaves that require grad)
            optimizer.load_parameter_state(str(path))
    finally:
        for st, step in held:
            st["step"] = step


def uses_distributed_optimizer(optimizer) -> bool:
    """Whether any of Megatron's (chained) optimizers shards its state over DP."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in parts)


def distributed_optimizer_file() -> str:
    """One file per model-parallel rank: DP rank 0 of each TP x PP (x EP) position writes it
    (`save_parameter_state` gathers the shards over the DP group)."""
    from megatron.core import parallel_state as mpu

    parts = [f"tp{mpu.get_tensor_model_parallel_rank()}", f"pp{mpu.get_pipeline_model_parallel_rank()}"]
    if mpu.get_expert_model_parallel_world_size() > 1:
        parts.append(f"ep{mpu.get_expert_model_parallel_rank()}")
    return f"distopt_{'_'.join(parts)}.pt"
