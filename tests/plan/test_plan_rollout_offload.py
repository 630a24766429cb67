"""An unset `actor.offload_during_rollout` with colocated vLLM: the plan keeps the training state
on the GPU when the rollout phase with it kept fits (plan/passes.py `choose_rollout_offload`),
checked against issue 20's measured e2e workload (docs/BENCHMARKS.md "End-to-end GRPO step vs TRL")."""
import json
from pathlib import Path

import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import resolve_plan
from megatron_rl.plan.passes import OFFLOAD_FIT_MARGIN, choose_rollout_offload
from megatron_rl.plan.run_plan import rollout_kept_gib
from tools import bench_e2e

H200_GIB = 139.7
LLAMA_70B = Path(__file__).resolve().parents[2] / "configs" / "llama3_70b_grpo.yaml"


def e2e_plan(tmp_path, *extra, device="cuda"):
    """tools/bench_e2e.py's megatron-rl config: SmolLM2-1.7B shape, one GPU, gpu_memory_utilization 0.42."""
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({**bench_e2e.SMOLLM2_1_7B, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    cfg = load_experiment_config(None, bench_e2e.mrl_config(tmp_path, 0.42, 4, list(extra), tmp_path / "run"))
    return resolve_plan(cfg, world_size=1, device=device, shape=str(hf), gpu_mem_gib=H200_GIB)


def llama70b_single_node(*extra):
    cfg = load_experiment_config(LLAMA_70B, ["model.pp=1", "model.vpp=null", *extra])
    return resolve_plan(cfg, world_size=8, device="cuda", gpu_mem_gib=80.0)


def test_e2e_workload_on_an_h200_keeps_the_state(tmp_path):
    """Measured (one H200): `none` 8.06 s/step at a 91.6 GiB device peak, `state` 9.11 s at 76.4 GiB.
    Estimate: 28.7 GiB weights + grads + optimizer (1.71B x 18 B) + 58.7 GiB vLLM pool (0.42 x 139.7)
    + 2.5 GiB overhead = 89.9 GiB, 1.7 GiB under the measured peak, of a 125.7 GiB budget -> none."""
    p = e2e_plan(tmp_path)
    c = p.memory.components_gib
    state = c["actor weights"] + c["actor grads"] + c["optimizer"]
    assert state == pytest.approx(28.7, abs=0.05) and c["rollout engine"] == pytest.approx(0.42 * H200_GIB)
    assert p.rollout.offload_during_rollout == "none"
    assert p.memory.phases_gib["rollout"] == pytest.approx(state + 0.42 * H200_GIB + 2.5)
    assert p.memory.phases_gib["rollout"] == pytest.approx(89.9, abs=0.05)
    assert abs(p.memory.phases_gib["rollout"] - 91.6) < 2.0          # the measured peak with `none`
    budget = H200_GIB * (1 - OFFLOAD_FIT_MARGIN)
    assert p.rollout.offload_reason.startswith(f"fits: 89.9 of {budget:.1f} GiB")


def test_70b_at_tp8_on_80gib_offloads_the_state():
    p = llama70b_single_node()
    kept = rollout_kept_gib(p, 80.0)
    c = p.memory.components_gib
    assert p.rollout.offload_during_rollout == "state" and kept > 72.0
    assert p.rollout.offload_reason.startswith(f"kept: {kept:.1f} > 72.0 GiB")
    assert p.memory.phases_gib["rollout"] == pytest.approx(kept - c["actor grads"] - c["optimizer"])


def test_70b_shipped_layout_pp4_fits_with_the_state_kept():
    """configs/llama3_70b_grpo.yaml as shipped (64 GPUs, TP=8 PP=4 VPP=5, 0.45 x 80 GiB vLLM pool): the
    worst stage keeps 63.9 GiB in the rollout phase, under 72 GiB -> none."""
    p = resolve_plan(load_experiment_config(LLAMA_70B), world_size=64, device="cuda", gpu_mem_gib=80.0)
    assert p.rollout.offload_during_rollout == "none"
    kept = rollout_kept_gib(p, 80.0)
    assert kept == pytest.approx(63.9, abs=0.05) and p.memory.phases_gib["rollout"] == pytest.approx(kept)


def test_explicit_settings_are_kept(tmp_path):
    p = e2e_plan(tmp_path, "actor.offload_during_rollout=state")
    assert (p.rollout.offload_during_rollout, p.rollout.offload_reason) == ("state", "actor.offload_during_rollout=state")
    p = llama70b_single_node("actor.offload_during_rollout=none")
    assert (p.rollout.offload_during_rollout, p.rollout.offload_reason) == ("none", "actor.offload_during_rollout=none")
    assert llama70b_single_node("actor.offload_during_rollout=state_and_weights"
                                ).rollout.offload_during_rollout == "state_and_weights"


def test_cpu_and_unknown_shape_keep_todays_rule():
    cpu = resolve_plan(load_experiment_config(None, ["data.train_batch_size=4", "rollout.n=2"]),
                       world_size=1, device="cpu", shape="smollm2-135m")
    assert (cpu.rollout.offload_during_rollout, cpu.rollout.offload_reason) == ("none", "no colocated vLLM engine")
    unknown = resolve_plan(load_experiment_config(None, ["model.path=none", "data.train_batch_size=4", "rollout.n=2",
                                                         "rollout.engine=vllm"]), world_size=1, device="cuda")
    assert unknown.rollout.offload_during_rollout == "state"
    assert unknown.rollout.offload_reason == "colocated vLLM; memory not estimated (model shape unknown)"


def test_summary_line_says_which_and_why(tmp_path):
    line = next(ln for ln in e2e_plan(tmp_path).summary().splitlines() if "training state during rollout" in ln)
    assert "offload none (fits: 89.9 of 125.7 GiB = 139.7 GiB less a 10% margin" in line
    line = next(ln for ln in llama70b_single_node().summary().splitlines() if "training state during rollout" in ln)
    assert "offload state (kept: " in line and " > 72.0 GiB = 80 GiB less a 10% margin)" in line


def test_choose_rollout_offload_margin_boundary():
    assert choose_rollout_offload(72.0, 80.0)[0] == "none"
    assert choose_rollout_offload(72.01, 80.0)[0] == "state"


def test_vllm_keys_under_the_native_engine_are_refused_by_name():
    """rollout.vllm.* acts only on the vLLM engine: set with rollout.engine=native, the plan refuses it."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import PlanError, resolve_plan

    base = ["model.path=llama-1b", "rollout.engine=native"]
    resolve_plan(load_experiment_config(None, base), world_size=1, device="cpu", shape="llama-1b")
    cfg = load_experiment_config(None, base + ["rollout.vllm.per_request_seed=false", "rollout.vllm.sleep_level=2"])
    with pytest.raises(PlanError, match=r"rollout.vllm.sleep_level, rollout.vllm.per_request_seed set with "
                                        r"rollout.engine=native"):
        resolve_plan(cfg, world_size=1, device="cpu", shape="llama-1b")


def test_release_torch_cache_without_a_sleeping_colocated_engine_is_refused():
    """rollout.vllm.release_torch_cache acts before a colocated vLLM wakes from sleep, nowhere else."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import PlanError, resolve_plan

    base = ["model.path=llama-1b", "rollout.engine=vllm", "rollout.vllm.release_torch_cache=auto"]
    plan = lambda *o: resolve_plan(load_experiment_config(None, base + list(o)), world_size=1, device="cuda",
                                   shape="llama-1b")
    plan()                                                           # colocated, sleep level 1: accepted
    for extra, bad in ((["rollout.vllm.sleep_level=0"], "sleep_level=0"), (["rollout.colocate=false"], "colocate=False")):
        with pytest.raises(PlanError, match=rf"rollout.vllm.release_torch_cache='auto'.*{bad}"):
            plan(*extra)
