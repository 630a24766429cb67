"""Training on SAE-steered rollouts: the old log-probs are recomputed under the same
per-sample steering, so they match the engine's sampling log-probs (off-policy error
~0); without steering in the recompute they would not."""
import importlib.util
import json
from pathlib import Path

from megatron_rl.steering.sae import save_sae
from megatron_rl.trainer.main import train_main

_spec = importlib.util.spec_from_file_location("steer_conftest", Path(__file__).parents[1] / "steering" / "conftest.py")
_steer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_steer)


def test_steered_rollout_logprobs_are_recomputed_under_steering(tiny_run, tmp_path):
    overrides, run_dir = tiny_run
    sae = _steer.make_sae("standard", d_in=64, d_sae=32, layer=1, seed=0)
    save_sae(sae, tmp_path / "sae")
    steer = ["steering.enable=true", f"steering.sae_path={tmp_path / 'sae'}", "steering.feature_idxs=[3]",
             "steering.strengths=[8.0]", "steering.max_activations=[4.0]", "rollout.temperature=1.0",
             "trainer.total_steps=1", "trainer.val_before_train=false"]
    assert train_main(None, overrides + steer) == 0
    row = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][0]
    assert row["rollout/logprob_diff"] < 1e-4
    assert row["rollout/logprob_diff_max"] < 1e-3


def test_rollout_is_trains_the_unsteered_llm_with_truncated_is_weights(tiny_run, tmp_path):
    """old log-probs are unsteered (far from the steered rollout's), the update forward is unsteered
    too (ppo_kl 0 on the first, only, optimizer step) and the weights are capped."""
    overrides, run_dir = tiny_run
    sae = _steer.make_sae("standard", d_in=64, d_sae=32, layer=1, seed=0)
    save_sae(sae, tmp_path / "sae")
    steer = ["steering.enable=true", f"steering.sae_path={tmp_path / 'sae'}", "steering.feature_idxs=[3]",
             "steering.strengths=[8.0]", "steering.max_activations=[4.0]", "steering.logprob_mode=rollout_is",
             "steering.rollout_is_cap=1.5", "rollout.temperature=1.0", "trainer.total_steps=1",
             "trainer.val_before_train=false"]
    assert train_main(None, overrides + steer) == 0
    row = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][0]
    assert row["rollout/logprob_diff"] > 0.05            # steering moved the behaviour policy
    assert 0.0 < row["rollout_is/weight_mean"] <= 1.5 and row["rollout_is/weight_max"] <= 1.5
    assert abs(row["actor/ppo_kl"]) < 1e-5 and row["actor/pg_clipfrac"] == 0.0
