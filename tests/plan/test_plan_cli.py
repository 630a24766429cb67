"""`megatron-rl plan` as a user runs it: a subprocess, no GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_plan(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "megatron_rl.cli", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_plan_70b_on_64_gpus_prints_the_facts(tmp_path):
    out_json = tmp_path / "plan.json"
    r = run_plan("--config", "configs/llama3_70b_grpo.yaml", "--world-size", "64", "--json", str(out_json))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "TP=8 PP=4 VPP=5 CP=1 EP=1 DP=2 SP" in out
    assert "512 (256 per DP rank)" in out                              # samples per step: 64 prompts x 8
    assert "optimizer steps/rollout  2" in out                         # 512 / mini-batch 256
    assert "1000 optimizer steps over 500 rollout steps" in out        # LR horizon
    assert "| reference     | no        | host_offload |" in out
    assert "vllm, colocated" in out and "per-GPU memory: peak" in out and ": fits" in out
    plan = json.loads(out_json.read_text())
    assert plan["batch"]["lr_horizon_steps"] == 1000 and plan["memory"]["fits"] is True


def test_vpp_that_does_not_divide_the_layers_exits_nonzero_naming_model_vpp():
    r = run_plan("--config", "configs/llama3_70b_grpo.yaml", "--world-size", "64", "model.vpp=3")
    assert r.returncode != 0
    assert "model.vpp=3: num_layers=80 is not divisible by model.pp * model.vpp = 4 * 3 = 12" in r.stderr


def test_bad_world_size_names_the_parallel_keys():
    r = run_plan("--config", "configs/quickstart_cpu.yaml", "--device", "cpu", "--world-size", "3")
    assert r.returncode != 0 and "data.train_batch_size=8" in r.stderr and "dp=3" in r.stderr
