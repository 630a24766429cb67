"""Kill-and-resume soak: SIGKILL a training run at random points, resume it with
`trainer.resume=auto` each time, and check that its per-step metrics equal an
uninterrupted run's.

    python tools/fault_soak.py --kills 20 --steps 6 --seed 0 [--async-save] [--workdir DIR]

Builds the tiny offline set-up of tests/trainer/conftest.py (random tiny Llama, word
tokenizer, rule reward), runs it once uninterrupted, then again with kills: each trainer
subprocess gets `MEGATRON_RL_FAULT_KILL=point:n` (megatron_rl/trainer/faults.py) at a random
point (a step's start, after the backward, while a checkpoint is written, right after its
rename, after the save) and is resumed until the run completes. Prints one line per kill and
a summary; exits 1 on any metric mismatch. Used by tests/faults/test_kill_resume.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POINTS = ("step", "update", "save_write", "save_renamed", "saved")
ASYNC_POINTS = POINTS + ("save_async",)     # `save_async`: a background checkpoint write has just started
VOLATILE = ("timing/", "perf/")
_RUN = "import sys; from megatron_rl.trainer.main import train_main; sys.exit(train_main(None, sys.argv[1:]))"


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows (a line a kill cut short is dropped: the step is re-run and logged)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE) and k not in ("time", "timestamp")}


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


ORPHANS: list[int] = []     # per trainer process: how many of its children outlived it


def train_subprocess(overrides: list[str], env_extra: dict | None = None, timeout: float = 600,
                     log_file: Path | None = None) -> int:
    """One trainer process (`train_main`) in its own process group; its return code (-9:
    SIGKILLed). Children that outlive it (Megatron's checkpoint-writer Manager, ...) are counted
    in `ORPHANS` and then killed with the group, so a soak does not pile them up."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    root = Path(__file__).resolve().parents[1]
    log_file = log_file or Path(tempfile.mkstemp(prefix="fault_soak_", suffix=".log")[1])
    with open(log_file, "a") as out:
        proc = subprocess.Popen([sys.executable, "-c", _RUN, *overrides], env=env, cwd=root, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        finally:
            time.sleep(0.2)
            left = group_members(proc.pid)
            ORPHANS.append(len(left))
            if left:
                os.killpg(proc.pid, signal.SIGKILL)
    if rc not in (0, -9):
        raise RuntimeError(f"trainer exited with {rc}:\n{log_file.read_text()[-4000:]}")
    return rc


def run_with_kills(overrides: list[str], kills: list[str], log=print) -> list[int]:
    """Run to completion under `trainer.resume=auto`, the i-th process killed at `kills[i]`
    (`point:n`); a process that completes before its kill ends the schedule. Return codes."""
    codes = []
    for spec in kills:
        t0 = time.time()
        rc = train_subprocess(overrides + ["trainer.resume=auto"], {"MEGATRON_RL_FAULT_KILL": spec})
        codes.append(rc)
        log(f"kill at {spec:<16} rc={rc:>3}  {time.time() - t0:5.1f}s  children left behind: {ORPHANS[-1]}")
        if rc == 0:
            return codes
    codes.append(train_subprocess(overrides + ["trainer.resume=auto"]))
    return codes


def random_kills(n: int, seed: int, max_hit: int = 3, points: tuple = POINTS) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(points)}:{rng.randint(1, max_hit)}" for _ in range(n)]


def compare(reference: list[dict], resumed: list[dict], rel: float = 0.0) -> list[str]:
    """Mismatches between each logged row of the resumed run and the reference row of its step
    (exact unless `rel`); a step the resumed run never logged is a mismatch too."""
    ref = {r["step"]: stable(r) for r in reference}
    seen, out = set(), []
    for row in resumed:
        s = stable(row)
        step = s["step"]
        seen.add(step)
        for k, v in ref.get(step, {}).items():
            got = s.get(k)
            same = got == v or (isinstance(v, float) and isinstance(got, float) and
                                (math.isnan(v) and math.isnan(got) or abs(got - v) <= rel * abs(v)))
            if not same:
                out.append(f"step {step} {k}: {got!r} != {v!r}")
    out += [f"step {s}: never logged" for s in sorted(set(ref) - seen)]
    return out


def tiny_setup(workdir: Path, steps: int) -> tuple[list[str], Path]:
    """The deterministic tiny run of tests/trainer/conftest.py, checkpointing every step."""
    from megatron_rl.data.writers import write_jsonl
    from tests.helpers import make_tiny_hf, write_word_tokenizer
    from tests.trainer.conftest import REWARD_FILE, WORDS

    hf = make_tiny_hf(workdir / "model", "llama", tie=True)
    write_word_tokenizer(hf, WORDS)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    qs = ["what is two plus two ?", "what is one plus three ?", "give the number four", "what is three plus one ?"]
    for split, n in (("train", 16), ("val", 4)):
        write_jsonl(data / f"{split}.jsonl", [{"prompt": qs[i % len(qs)], "ground_truth": "4"} for i in range(n)])
    (workdir / "reward.py").write_text(REWARD_FILE)
    overrides = [f"model.path={hf}", "model.layer_spec=local", f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.val_files=[{data / 'val.jsonl'}]", "data.train_batch_size=2", "data.max_prompt_length=16",
                 "rollout.n=2", "rollout.max_new_tokens=5", "actor.micro_batch_size=2", "actor.optim.lr=1e-3",
                 "reward.name=fours", f"reward.custom_functions={{fours: '{workdir / 'reward.py'}:count_fours'}}",
                 "reward.num_workers=0", "logging.sinks=[jsonl]", f"trainer.total_steps={steps}", "trainer.seed=3",
                 "trainer.deterministic=true", "trainer.num_threads=1", "trainer.save_every=1",
                 "trainer.val_before_train=false"]
    return overrides, workdir


KILLED: list[int] = []      # SIGKILLs delivered by the last `soak` (a scheduled point may not be reached)


def soak(kills: list[str], steps: int, workdir: Path, log=print, async_save: bool = False) -> list[str]:
    """Reference run + killed run in `workdir`; the mismatches (empty: identical). The number
    of kills actually delivered is left in `KILLED[0]`. `async_save`: the killed run writes its
    checkpoints in the background (`trainer.async_save`); the reference stays synchronous."""
    overrides, _ = tiny_setup(workdir, steps)
    ref_dir, run_dir = workdir / "reference", workdir / "killed"
    train_subprocess(overrides + [f"logging.run_dir={ref_dir}", "trainer.resume=none"])
    killed = overrides + [f"logging.run_dir={run_dir}"] + (["trainer.async_save=true"] if async_save else [])
    codes = run_with_kills(killed, kills, log)
    KILLED[:] = [sum(rc == -9 for rc in codes)]
    return compare(read_metrics(ref_dir), read_metrics(run_dir))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--async-save", action="store_true", help="the killed run saves asynchronously "
                   "(trainer.async_save); kills also land right after a background write started")
    p.add_argument("--max-hit", type=int, default=3, help="a kill point fires at its n-th hit, n in 1..max-hit; "
                   "1 kills each process at its first hit (most kills per step)")
    a = p.parse_args(argv)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="fault_soak_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    kills = random_kills(a.kills, a.seed, a.max_hit, ASYNC_POINTS if a.async_save else POINTS)
    bad = soak(kills, a.steps, workdir, async_save=a.async_save)
    print(f"{KILLED[0]} SIGKILLs delivered ({len(kills)} scheduled), {a.steps} steps, {time.time() - t0:.0f}s, "
          f"children left behind: {sum(ORPHANS)} over {len(ORPHANS)} trainer processes: "
          f"{'IDENTICAL per-step metrics' if not bad else f'{len(bad)} MISMATCHES'} (workdir {workdir})")
    for line in bad[:20]:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
