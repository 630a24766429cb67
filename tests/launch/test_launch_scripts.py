"""Launch scripts: syntax, argument pass-through, the SLURM dry run of a 4-node allocation,
and the planner / peak-memory tools end to end on CPU."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["launch/torchrun.sh", "launch/slurm/train.sbatch", "launch/slurm/node.sh"]


def run(cmd, env_extra=None, path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(env_extra or {})
    if path is not None:
        env["PATH"] = path
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_bash_n(script):
    r = run(["bash", "-n", script])
    assert r.returncode == 0, r.stderr


def test_torchrun_sh_passes_config_and_overrides_unchanged():
    r = run(["bash", "launch/torchrun.sh", "--nproc", "2", "--cpu", "--", "--config", "configs/quickstart_cpu.yaml",
             "trainer.total_steps=2", "actor.optim.lr=1e-6"], {"DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip().splitlines()[-1]
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_rl.cli train " \
           "--config configs/quickstart_cpu.yaml trainer.total_steps=2 actor.optim.lr=1e-6" in cmd
    assert "CUDA_VISIBLE_DEVICES=''" in r.stdout          # --cpu hides GPUs: gloo


def test_torchrun_sh_without_train_args_is_an_error():
    r = run(["bash", "launch/torchrun.sh", "--cpu"], {"DRY_RUN": "1"})
    assert r.returncode == 2 and "missing train arguments" in r.stderr


def _dry_run_4_nodes(path):
    env = {"DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[07-10]",
           "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "8"}
    r = run(["bash", "launch/slurm/train.sbatch", "--config", "configs/llama3_70b_grpo.yaml", "trainer.total_steps=3"],
            env, path)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if ln.startswith("[node ")]


def _check_node_lines(lines):
    assert len(lines) == 4
    for i, (line, host) in enumerate(zip(lines, ["gpu07", "gpu08", "gpu09", "gpu10"])):
        assert line.startswith(f"[node {i} {host}]")
        assert f"--nnodes 4 --node-rank {i} --nproc-per-node 8" in line
        assert "--rdzv-backend c10d --rdzv-endpoint gpu07:29500 --rdzv-id 4242" in line
        assert re.search(rf"--log-dir \S+/node{i} --redirects 3 --tee 3", line)
        assert line.rstrip().endswith("-m megatron_rl.cli train --config configs/llama3_70b_grpo.yaml "
                                      "trainer.total_steps=3")


def test_sbatch_dry_run_4_nodes_without_scontrol(tmp_path):
    bindir = tmp_path / "bin"          # bash and coreutils only: no scontrol
    bindir.mkdir()
    for tool in ("bash", "head", "hostname", "dirname", "mkdir"):
        src = shutil.which(tool)
        if src:
            (bindir / tool).symlink_to(src)
    _check_node_lines(_dry_run_4_nodes(str(bindir)))


def test_sbatch_dry_run_4_nodes_uses_scontrol_when_present(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "scontrol"
    fake.write_text("#!/usr/bin/env bash\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu07\\ngpu08\\ngpu09\\ngpu10\\n'\n")
    fake.chmod(0o755)
    _check_node_lines(_dry_run_4_nodes(f"{bindir}:{os.environ['PATH']}"))


def test_sbatch_has_requeue_and_usr1_trap():
    text = (ROOT / "launch/slurm/train.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@300" in text
    assert "trap requeue USR1" in text and "scontrol requeue" in text
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in text


def test_plan_memory_cli_prints_table_and_suggestions(capsys):
    sys.path.insert(0, str(ROOT))
    from tools.plan_memory import main
    rc = main(["--config", str(ROOT / "configs/llama3_70b_grpo.yaml"), "--gpus", "64", "--hf-config", "llama3-70b"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| optimizer        |" in out and "FITS" in out and "smallest layouts that fit" in out


def test_plan_memory_cli_reports_config_errors(capsys):
    sys.path.insert(0, str(ROOT))
    from tools.plan_memory import main
    rc = main(["--config", str(ROOT / "configs/llama3_70b_grpo.yaml"), "--hf-config", "llama3-70b", "model.tpp=2"])
    assert rc == 2 and "model.tpp" in capsys.readouterr().err


@pytest.mark.multiproc
def test_measure_peak_memory_runs_tp2_on_cpu():
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "tools/measure_peak_memory.py", "--tiny", "--tp", "2", "--num-microbatches", "2", "--steps", "2"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 0 | 0 | 0 | only | None |" in r.stdout and "| 1 | 1 | 0 | only | None |" in r.stdout
