"""Checkpoints of a predictor-training run: the predictor, its optimizer, the RNG and the trainer
state (step, data sampler, validation baseline). The LLM is frozen and is not saved: a resumed
run reads it from `model.path` again.

Same layout and atomicity as `trainer/checkpoint.py`: written to `step_N.tmp`, renamed when
complete, `latest` names the newest, the last `keep_last` are kept, so `trainer.resume: auto`
never picks half a checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_rl.trainer.checkpoint import _barrier, _rank, checkpoint_root, publish

PREDICTOR_FILE = "predictor.pt"


def save_predictor_checkpoint(run_dir, step: int, predictor_state: dict, trainer_state: dict,
                              keep_last: int = 2) -> Path:
    """Rank 0 writes (the predictor is replicated: its gradients are averaged over DP)."""
    root = checkpoint_root(run_dir)
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        torch.save({**predictor_state, "torch_rng": torch.get_rng_state()}, tmp / PREDICTOR_FILE)
        publish(root, tmp, final, step, trainer_state, keep_last)
    _barrier()
    return final


def load_predictor_checkpoint(path: Path) -> tuple[dict, dict]:
    """(predictor state for `StrengthPredictorTrainer.load_state_dict`, trainer state)."""
    f = Path(path) / PREDICTOR_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f}: not a strength-predictor checkpoint (trainer.resume={path}); "
                                f"an LLM-training checkpoint cannot resume predictor training")
    state = torch.load(f, weights_only=False)
    torch.set_rng_state(state.pop("torch_rng"))
    return state, json.loads((Path(path) / "trainer_state.json").read_text())
