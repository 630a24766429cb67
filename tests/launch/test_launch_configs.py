"""The 70B-class configs load with the experiment schema and fit their target cluster."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import memory as mp
from megatron_rl.plan import resolve_plan

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"llama3_70b_grpo.yaml": "llama3-70b", "qwen2_72b_grpo.yaml": "qwen2-72b"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_loads_with_multi_node_parallelism(name):
    cfg = load_experiment_config(ROOT / "configs" / name)
    m = cfg.model
    assert (m.tp, m.pp, m.vpp, m.sequence_parallel, m.recompute, m.dtype) == (8, 4, 5, True, "selective", "bfloat16")
    assert cfg.actor.optim.distributed_optimizer is True
    assert (cfg.rollout.engine, cfg.rollout.colocate) == ("vllm", True)
    assert cfg.ref.enable and cfg.ref.offload
    assert cfg.trainer.resume == "auto"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_fits_8_nodes_of_8_h100(name):
    cfg = load_experiment_config(ROOT / "configs" / name)
    run = resolve_plan(cfg, world_size=64, device="cuda", shape=CONFIGS[name])
    plan = mp.estimate(mp.inputs_from_plan(run, gpu_mem_gib=80))
    assert run.memory is not None and run.memory.peak_gib == pytest.approx(plan.peak / mp.GiB)
    assert plan.fits, mp.format_plan(plan)
    assert plan.inputs.dp == 2 and plan.inputs.num_microbatches == 128


def test_inputs_from_plan_reads_lengths_and_batches():
    cfg = load_experiment_config(ROOT / "configs" / "llama3_70b_grpo.yaml",
                                 ["actor.micro_batch_size=2", "actor.fused_loss='off'"])
    p = mp.inputs_from_plan(resolve_plan(cfg, world_size=64, device="cuda", shape="llama3-70b"))
    assert p.seq_len == 1024 + 2048 and p.micro_batch == 2
    assert p.num_microbatches == 256 // 2 // 2          # mini-batch / DP / micro-batch
    assert p.loss_path == "unfused" and p.ref_enable and not p.ref_resident
    assert p.rollout_seqs == 64 * 8 // 2
