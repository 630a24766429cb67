"""Elastic resume: a checkpoint written at one DP/TP layout resumes at another (two gloo
processes). The actor's Adam state (exp_avg, exp_avg_sq per full parameter, the step) and LR
schedule after the load equal the saved ones exactly, the sampler continues the same global
prompt order, and the next update equals the uninterrupted run's."""
import json

import pytest

from tests.faults.elastic_workers import check, first_run, resumed_run
from tests.helpers import make_tiny_hf, run_multiproc


@pytest.mark.multiproc
def test_dp2_checkpoint_resumes_at_dp1_with_equal_optimizer_state_and_sampler_position(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run, ref, out = str(tmp_path / "run"), str(tmp_path / "ref.pt"), str(tmp_path / "out.pt")
    run_multiproc(first_run, 2, (hf, 1, run, ref))
    manifest = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert manifest["world_size"] == 2 and not any(f.startswith("rank0") for f in manifest["files"])
    run_multiproc(resumed_run, 1, (hf, 1, run, out))
    check(ref, out)


@pytest.mark.multiproc
def test_tp1_checkpoint_resumes_at_tp2_with_equal_gathered_optimizer_state(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run, ref, out = str(tmp_path / "run"), str(tmp_path / "ref.pt"), str(tmp_path / "out.pt")
    run_multiproc(first_run, 1, (hf, 1, run, ref))
    run_multiproc(resumed_run, 2, (hf, 2, run, out))
    check(ref, out)


@pytest.mark.slow   # same sharded path as the actor's DP/TP tests (CI)
@pytest.mark.multiproc
def test_critic_dp2_checkpoint_resumes_at_dp1_with_equal_optimizer_state(tmp_path):
    """The PPO critic (trunk + value head) is one Megatron distributed checkpoint under `critic/`
    like the actor: no per-rank files, Adam state and LR schedule equal after a DP change."""
    from tests.faults.value_elastic_workers import check_critic, critic_first_run, critic_resumed_run

    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run, ref, out = str(tmp_path / "run"), str(tmp_path / "ref.pt"), str(tmp_path / "out.pt")
    run_multiproc(critic_first_run, 2, (hf, run, ref))
    manifest = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert "critic/megatron_rl.json" in manifest["files"] and not any("_rank" in f and f.startswith("critic")
                                                                         for f in manifest["files"])
    run_multiproc(critic_resumed_run, 1, (hf, run, out))
    check_critic(ref, out)


@pytest.mark.slow   # ~19 s each; DP=2->1 and TP=1->2 stay in CI
@pytest.mark.multiproc
@pytest.mark.parametrize("pp_saved,pp_resumed,tie", [(2, 1, False), (1, 2, True)])
def test_pp_change_resumes_with_equal_optimizer_state(tmp_path, pp_saved, pp_resumed, tie):
    """Megatron's sharded keys use global layer numbers: a PP=2 checkpoint (each stage writes its
    own layers, optimizer state included) loads at PP=1 and the reverse; with tied embeddings the
    last stage's output-layer copy gets the embedding's Adam state."""
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=tie)
    run, ref, out = str(tmp_path / "run"), str(tmp_path / "ref.pt"), str(tmp_path / "out.pt")
    run_multiproc(first_run, pp_saved, (hf, 1, run, ref, pp_saved))
    run_multiproc(resumed_run, pp_resumed, (hf, 1, run, out, pp_resumed))
    check(ref, out)
