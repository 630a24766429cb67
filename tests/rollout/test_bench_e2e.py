"""tools/bench_e2e.py without a GPU: variant specs, the megatron-rl config it builds (every key
accepted, per_request_seed included: true by default, false a variant), the table's "vs vLLM
alone" of the same seeding, and no device-generator re-seeding left in the vLLM-alone part."""
import json
import subprocess
import sys

import pytest

from tools import bench_e2e


def test_bench_e2e_variant_spec_keeps_list_values_whole():
    assert bench_e2e.parse_variant("a-1:x.y=1,data.files=[p,q],z={k: 1, j: 2}") == (
        "a-1", ["x.y=1", "data.files=[p,q]", "z={k: 1, j: 2}"])
    for bad in ("nolabel", ":x=1", "a b:x=1", "a:x"):
        with pytest.raises(SystemExit, match="--variant"):
            bench_e2e.parse_variant(bad)


def test_bench_e2e_mrl_config_loads(tmp_path):
    from megatron_rl.config import load_experiment_config

    default = load_experiment_config(None, bench_e2e.mrl_config(tmp_path, 0.42, 4, [], tmp_path / "run"))
    assert default.rollout.vllm.per_request_seed is True
    extra = ["rollout.vllm.per_request_seed=false", "actor.offload_during_rollout=none"]
    cfg = load_experiment_config(None, bench_e2e.mrl_config(tmp_path, 0.42, 4, extra, tmp_path / "run"))
    assert cfg.rollout.vllm.per_request_seed is False and cfg.trainer.total_steps == 4
    assert cfg.rollout.n == bench_e2e.SAMPLES and cfg.logging.run_dir == str(tmp_path / "run")


def test_bench_e2e_vllm_alone_params_seed_as_the_engine_does():
    """`request_seed` rows send `vllm_convert.request_seeds` of seed 0; `engine_seed` rows none;
    nothing re-seeds the device generator (measured not to make vLLM repeat)."""
    import inspect
    import types

    from megatron_rl.rollout.protocol import SamplingParams
    from megatron_rl.rollout.vllm_convert import request_seeds

    fake = types.SimpleNamespace(SamplingParams=lambda **kw: kw)
    seeded = [p["seed"] for p in bench_e2e.vllm_params(fake, "request_seed", False)]
    assert seeded == request_seeds(SamplingParams(seed=0, n=bench_e2e.SAMPLES), bench_e2e.PROMPTS)
    assert {p["seed"] for p in bench_e2e.vllm_params(fake, "engine_seed", True)} == {None}
    assert "seeded_device_generator" not in inspect.getsource(bench_e2e)


def test_bench_e2e_table_compares_with_the_same_seeding(tmp_path, capsys):
    row = lambda s: {"s": s, "tokens": 131072, "tokens_per_s": 131072 / s}
    (tmp_path / "vllm.json").write_text(json.dumps({
        "engine_seed_no_logprobs": row(4.0), "engine_seed_logprobs": row(8.0),
        "request_seed_no_logprobs": row(5.0), "request_seed_logprobs": {"error": "RuntimeError: x"},
        "peak_gib": 60.0, "kv_cache_tokens": 300000}))
    for label, seeded in (("eng", False), ("req", True)):
        (tmp_path / f"mrl_{label}.json").write_text(json.dumps({
            "label": label, "step_s": 8.0, "phases": {"rollout": 4.0, "update": 3.0, "reward": 0.1},
            "peak_gib": 100.0, "gen_tokens_per_s": 32768.0, "per_request_seed": seeded, "engine_logprobs": False}))
    (tmp_path / "trl.json").write_text(json.dumps({"step_s": 16.0, "peak_gib": 90.0}))
    bench_e2e.table(tmp_path)
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| megatron-rl")}
    assert "| 1.00x |" in rows["megatron-rl eng"] and "| 0.80x |" in rows["megatron-rl req"]
    assert "| 0.50 |" in rows["megatron-rl eng"]                       # vs TRL
    assert "RuntimeError: x" in out and "TRL GRPOTrainer" in out


def test_bench_e2e_help_without_cuda():
    out = subprocess.run([sys.executable, "tools/bench_e2e.py", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--variant" in out.stdout
