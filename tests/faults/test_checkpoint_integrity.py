"""Verified checkpoints: a damaged checkpoint is detected by its manifest and skipped (naming
the file), a full disk leaves the previous one loadable, re-saving a step never leaves
`latest` dangling, and loading refuses pickled objects."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_rl.trainer import checkpoint as ckpt
from megatron_rl.trainer.checkpoint import CheckpointManager, load_tensors, rank_file
from megatron_rl.trainer.manifest import MANIFEST, CheckpointCorrupt


class TensorRole:
    """A role whose state is one tensor (the checkpoint protocol without a model)."""

    def __init__(self, value: float):
        self.w = torch.full((4096,), float(value))

    def save_checkpoint(self, ckpt_dir, name):
        torch.save({"w": self.w}, rank_file(ckpt_dir, name))

    def load_checkpoint(self, ckpt_dir, name):
        self.w = load_tensors(rank_file(ckpt_dir, name))["w"]


def save_steps(run_dir, steps, keep_last=3, plan=None):
    mgr = CheckpointManager(run_dir, keep_last=keep_last, plan=plan)
    for s in steps:
        mgr.save(s, {"actor": TensorRole(s)}, {"data": {"pos": s}})
    return mgr


def restored_step(mgr):
    role = TensorRole(-1)
    path = mgr.find("auto")
    state = mgr.restore(path, {"actor": role})
    assert float(role.w[0]) == state["step"] == state["data"]["pos"]
    return state["step"]


def test_manifest_lists_every_file_with_size_crc32_and_plan(tmp_path):
    mgr = save_steps(tmp_path, [1], plan={"recipe": "grpo", "world_size": 1})
    d = mgr.root / "step_000001"
    m = json.loads((d / MANIFEST).read_text())
    assert m["checksum"] == "crc32" and m["plan"] == {"recipe": "grpo", "world_size": 1} and m["step"] == 1
    assert set(m["files"]) == {"actor_rank00000.pt", "rng_rank00000.pt", "trainer_state.json"}
    for name, rec in m["files"].items():
        assert rec["size"] == (d / name).stat().st_size and re.fullmatch(r"[0-9a-f]{8}", rec["crc32"])
    assert (mgr.root / "latest").read_text() == "step_000001"


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete", "no_manifest"])
def test_damaged_newest_checkpoint_is_skipped_and_previous_used(tmp_path, capsys, damage):
    mgr = save_steps(tmp_path, [1, 2])
    f = mgr.root / "step_000002" / "actor_rank00000.pt"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x10
        f.write_bytes(data)
    elif damage == "delete":
        f.unlink()
    else:
        (f.parent / MANIFEST).unlink()
    assert restored_step(mgr) == 1
    out = capsys.readouterr().out
    named = MANIFEST if damage == "no_manifest" else "actor_rank00000.pt"
    assert "step_000002 skipped" in out and named in out, out


def test_every_checkpoint_damaged_is_refused_not_restarted(tmp_path):
    mgr = save_steps(tmp_path, [1, 2])
    for s in (1, 2):
        f = mgr.root / f"step_00000{s}" / "trainer_state.json"
        f.write_text(f.read_text() + " ")
    with pytest.raises(CheckpointCorrupt, match="every checkpoint .* failed its check.*trainer_state.json"):
        mgr.find("auto")


def test_explicit_resume_path_that_fails_its_check_names_the_file(tmp_path):
    mgr = save_steps(tmp_path, [1])
    f = mgr.root / "step_000001" / "rng_rank00000.pt"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(CheckpointCorrupt, match=r"rng_rank00000.pt: \d+ bytes, the manifest says"):
        mgr.find(str(mgr.root / "step_000001"))


def test_disk_full_during_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_RL_FAULT_ENOSPC", "2")      # the second save hits a full disk
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, {"actor": TensorRole(1)}, {"data": {"pos": 1}})
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint is intact") as e:
        mgr.save(2, {"actor": TensorRole(2)}, {"data": {"pos": 2}})
    assert e.value.errno == 28
    assert not (mgr.root / "step_000002.tmp").exists()       # the partial save's space is freed
    assert [p.name for p in ckpt.complete_steps(mgr.root)] == ["step_000001"]
    assert restored_step(mgr) == 1


def test_killed_before_manifest_leaves_only_a_tmp_dir_that_resume_ignores(tmp_path):
    mgr = save_steps(tmp_path, [1])
    partial = mgr.root / "step_000002.tmp"
    shutil.copytree(mgr.root / "step_000001", partial)
    (partial / MANIFEST).unlink()
    assert restored_step(mgr) == 1


def test_resaving_an_existing_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    mgr = save_steps(tmp_path, [1, 2])
    seen = []

    def check_latest():
        name = (mgr.root / "latest").read_text().strip()
        seen.append(name)
        assert (mgr.root / name / MANIFEST).exists(), f"latest -> {name}, which is not a complete checkpoint"

    real_rmtree, real_replace = shutil.rmtree, ckpt.os.replace

    def rmtree(p, *a, **k):
        check_latest()
        real_rmtree(p, *a, **k)
        check_latest()

    def replace(a, b):
        check_latest()
        real_replace(a, b)
        if Path(b).name != "latest":
            check_latest()

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    mgr.save(2, {"actor": TensorRole(2)}, {"data": {"pos": 2}})      # step 2 again (a resumed run re-saves it)
    assert "step_000001" in seen                      # latest moved off step 2 while it was replaced
    assert (mgr.root / "latest").read_text() == "step_000002" and restored_step(mgr) == 2


def test_keep_last_two_keeps_a_fallback(tmp_path):
    mgr = save_steps(tmp_path, [1, 2, 3], keep_last=2)
    assert [p.name for p in ckpt.complete_steps(mgr.root)] == ["step_000003", "step_000002"]


class Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_loading_refuses_pickled_objects(tmp_path):
    f = tmp_path / "rank00000.pt"
    torch.save({"optimizer": {"x": Evil()}}, f)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_tensors(f)


def test_no_unsafe_unpickling_left_in_the_package():
    root = Path(__file__).resolve().parents[2] / "megatron_rl"
    hits = [f"{p}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if "weights_only=False" in line or "pickle.load" in line]
    assert hits == []
