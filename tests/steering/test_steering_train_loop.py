"""`megatron-rl train` with `steering.predictor.enable`: the predictor learns the best strength of a
toy task while the LLM stays frozen bit for bit; runs resume exactly.

Toy task: the SAE's feature 0 is the unembedding direction of the word "4", so steering along it
makes the tiny model say "4"; reward = -(fraction of "4" among the 8 generated tokens - 0.5)^2.
The best strength s* is where the expected reward peaks; the test measures that curve with the
same engine (512 rollouts per strength) and takes the vertex of a parabola through its top.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.steering.compare import frac_tokens_changed
from megatron_rl.steering.sae import save_sae
from megatron_rl.trainer import phases
from megatron_rl.trainer.main import train_main
from tests.helpers import make_tiny_hf, write_word_tokenizer
from tests.steering.conftest import make_sae

WORDS = "what is one two three four five plus ? give the number answer yes no 0 1 2 3 4 5 6 7 8 9".split()
N_SPECIAL = 7            # write_word_tokenizer's special tokens come first
REWARD = '''
def half_fours(response, sample, **kw):
    """Best when half of the 8 generated tokens are the word 4."""
    return -(response.split().count("4") / 8 - 0.5) ** 2
'''


def write_toy_assets(root) -> dict:
    """Tiny model + word tokenizer, the "4" SAE, prompts and the reward file under `root`."""
    from pathlib import Path

    root = Path(root)
    hf = make_tiny_hf(root / "model", "llama", tie=True)
    write_word_tokenizer(hf, WORDS)
    emb = load_file(f"{hf}/model.safetensors")["model.embed_tokens.weight"][N_SPECIAL + WORDS.index("4")]
    save_sae(make_sae(layer=3, rows={0: emb / emb.norm()}), root / "sae")
    data = root / "data"
    data.mkdir(exist_ok=True)
    for split, n in (("train", 8), ("val", 64)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": "give the number"}) + "\n"
                                                     for _ in range(n)))
    (root / "reward.py").write_text(REWARD)
    return {"model": hf, "sae": root / "sae", "data": data, "reward": root / "reward.py"}


@pytest.fixture
def toy(tmp_path):
    """(overrides, run_dir) of a predictor run on the toy task (configs/sae_steer_toy.yaml's settings).

    One intra-op thread (`trainer.num_threads=1`): the tensors are tiny, and on a busy 2-core box
    spinning threads made this run 20x slower; the setting is restored after the test."""
    threads = torch.get_num_threads()
    yield from _toy(tmp_path)
    torch.set_num_threads(threads)


def _toy(tmp_path):
    a = write_toy_assets(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [
        f"model.path={a['model']}", "model.layer_spec=local", f"data.train_files=[{a['data'] / 'train.jsonl'}]",
        f"data.val_files=[{a['data'] / 'val.jsonl'}]", "data.train_batch_size=8", "data.max_prompt_length=16",
        "rollout.n=16", "rollout.max_new_tokens=8", "rollout.temperature=0.15", "reward.name=half",
        f"reward.custom_functions={{half: '{a['reward']}:half_fours'}}", "reward.num_workers=0",
        f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]", "trainer.seed=3", "trainer.val_before_train=false",
        "steering.enable=true", f"steering.sae_path={a['sae']}", "steering.feature_idxs=[0]",
        "steering.max_activations=[0.05]", "steering.predictor.enable=true", "steering.predictor.n_samples=16",
        "steering.predictor.hidden=16", "steering.predictor.min_strength=0", "steering.predictor.max_strength=12",
        "steering.predictor.init_std=1.0", "steering.predictor.lr=0.01", "steering.predictor.compare_every=50",
        "trainer.num_threads=1"]
    yield overrides, run_dir


def best_strength(trainer, grid=np.linspace(2.5, 6.5, 17), reps=512) -> float:
    """Vertex of a parabola through the measured expected reward around its peak."""
    prompts = trainer.data.next_batch().select([0])
    batch = prompts.repeat_interleave(len(grid) * reps)
    batch["steer_strengths"] = torch.tensor(grid, dtype=torch.float32).repeat_interleave(reps)[:, None]
    out = trainer.engine.generate(batch, dataclasses.replace(phases.sampling_params(trainer.cfg, 1), n=1))
    reward = np.asarray(trainer.score(out)).reshape(len(grid), reps).mean(1)
    top = int(np.argmax(reward))
    lo, hi = max(0, top - 4), min(len(grid), top + 5)
    a, b, _ = np.polyfit(grid[lo:hi], reward[lo:hi], 2)
    return float(-b / (2 * a))


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_predictor_converges_to_best_strength_with_llm_frozen(toy, monkeypatch):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer import steering_loop as train_loop

    overrides, run_dir = toy
    overrides = overrides + ["trainer.total_steps=150"]
    s_star = best_strength(train_loop.build_predictor_trainer(load_experiment_config(None, overrides)))
    assert 3.0 < s_star < 5.0                            # inside the range, far from the start (6)

    built, build = {}, train_loop.build_predictor_trainer

    def build_and_snapshot(cfg):
        tr = built["trainer"] = build(cfg)
        built["llm"] = {k: v.clone() for k, v in tr.llm.model.state_dict().items() if torch.is_tensor(v)}
        return tr

    monkeypatch.setattr(train_loop, "build_predictor_trainer", build_and_snapshot)
    assert train_main(None, overrides) == 0
    log = rows(run_dir)
    means = [r["steering/policy_mean/0"] for r in log]
    final = float(np.mean(means[-20:]))                  # the policy mean, averaged over the last 20 steps
    print(f"s*={s_star:.3f} step1={means[0]:.3f} final={final:.3f} last={means[-1]:.3f} "
          f"policy_std={log[-1]['steering/policy_std/0']:.3f}")
    assert abs(final - s_star) < 0.1 * s_star
    assert means[0] > 5.0                                # started at mid-range 6, i.e. > 1.2 s* away
    after = built["trainer"].llm.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in built["llm"].items())
    assert all(p.grad is None and not p.requires_grad for p in built["trainer"].llm.model.parameters())
    assert np.mean([r["reward/mean"] for r in log[-10:]]) > np.mean([r["reward/mean"] for r in log[:5]]) + 0.03
    compared = [r for r in log if "steering/frac_tokens_changed" in r]
    assert len(compared) == 3 and all(r["steering/frac_tokens_changed"] > 0.5 for r in compared)
    assert {"steering/strength_mean", "steering/strength_std", "steering/predictor_loss",
            "steering/reward_steered", "steering/reward_unsteered", "val/reward"} <= set(log[-1])


def test_resume_continues_exactly(toy):
    overrides, run_dir = toy
    base = overrides + ["steering.predictor.compare_every=0"]
    assert train_main(None, base + ["trainer.total_steps=6", "trainer.save_every=3"]) == 0
    straight = rows(run_dir)
    pred_straight = torch.load(run_dir / "checkpoints" / "step_000006" / "predictor.pt", weights_only=False)
    import shutil
    shutil.rmtree(run_dir / "checkpoints" / "step_000006")             # as if the run died after step 3
    (run_dir / "checkpoints" / "latest").write_text("step_000003")
    (run_dir / "metrics.jsonl").unlink()
    assert train_main(None, base + ["trainer.total_steps=6", "trainer.save_every=3"]) == 0
    resumed = rows(run_dir)
    assert [r["steering/policy_mean/0"] for r in resumed[-3:]] == [r["steering/policy_mean/0"] for r in straight[-3:]]
    pred_resumed = torch.load(run_dir / "checkpoints" / "step_000006" / "predictor.pt", weights_only=False)
    assert all(torch.equal(v, pred_resumed["predictor"][k]) for k, v in pred_straight["predictor"].items())
    assert pred_resumed["steps"] == 6


def _dp_worker(rank, world, overrides, out_dir):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.steering_loop import build_predictor_trainer

    tr = build_predictor_trainer(load_experiment_config(None, overrides))
    try:
        tr.fit()
    finally:
        tr.logger.close()
        tr.rewards.close()
    torch.save({k: v.clone() for k, v in tr.predictor.predictor.state_dict().items()}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.multiproc
def test_data_parallel_replicas_stay_identical(toy, tmp_path):
    """DP=2: each rank draws its own strength noise; gradients averaged over DP keep the two
    predictors equal (they would drift apart after one step otherwise)."""
    from tests.helpers import run_multiproc

    overrides, _ = toy
    run_multiproc(_dp_worker, 2, (overrides + ["trainer.total_steps=3"], str(tmp_path)))
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.3.bias"], torch.zeros_like(a["net.3.bias"]))      # it did learn


def test_frac_tokens_changed_counts_differing_and_missing_positions():
    a = torch.tensor([[5, 6, 7], [1, 2, 0]])
    am = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    b = torch.tensor([[5, 9], [1, 2]])
    bm = torch.tensor([[1.0, 1], [1, 1]])
    # row 0: pos 1 differs, pos 2 only in a -> 2 of 3; row 1: identical over 2 -> 0 of 2
    assert frac_tokens_changed(a, am, b, bm) == pytest.approx(2 / 5)
    assert frac_tokens_changed(b, bm, b, bm) == 0.0


def test_rollout_n_must_equal_predictor_samples(toy):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.steering_loop import build_predictor_trainer

    overrides, _ = toy
    with pytest.raises(ValueError, match="rollout.n=4 but steering.predictor.n_samples=16"):
        build_predictor_trainer(load_experiment_config(None, overrides + ["rollout.n=4"]))


if __name__ == "__main__":      # python -m tests.steering.test_steering_train_loop DIR: assets for configs/sae_steer_toy.yaml
    import sys

    print(write_toy_assets(sys.argv[1] if len(sys.argv) > 1 else "runs/sae_steer_toy/assets"))
