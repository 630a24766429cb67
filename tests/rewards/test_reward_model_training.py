"""The reward model as a role: a CPU GRPO run whose reward is a toy sequence-classification
model (tools/make_toy_reward_model.py, trained to prefer the token '4') raises the policy's
reward under that model; `reward.combine` logs each component."""
import json

from megatron_rl.trainer.main import train_main
from tests.trainer.conftest import tiny_run  # noqa: F401  (fixture)
from tools.make_toy_reward_model import make_toy_reward_model


def test_grpo_reward_under_toy_reward_model_rises(tiny_run, tmp_path):  # noqa: F811
    overrides, run_dir = tiny_run
    model_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.path="))
    rm = tmp_path / "toy_rm"
    make_toy_reward_model(str(rm), model_dir, "4", steps=150)
    keep = [o for o in overrides if not o.startswith(("reward.", "trainer.total_steps", "actor.optim.lr",
                                                       "rollout.n", "rollout.max_new_tokens"))]
    run = keep + [f"reward.model.path={rm}", "reward.model.micro_batch_size=4", "reward.combine={model: 1.0, fours: 0.0}",
                  f"reward.custom_functions={{fours: '{tmp_path / 'reward.py'}:count_fours'}}", "reward.num_workers=0",
                  "trainer.total_steps=12", "actor.optim.lr=1e-2", "rollout.n=4", "rollout.max_new_tokens=6",
                  "trainer.val_before_train=false", "trainer.final_validation=false"]
    assert train_main(None, run) == 0
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    rows = [r for r in rows if "reward/mean" in r]
    means = [r["reward/mean"] for r in rows]
    print("reward/mean per step:", [round(m, 3) for m in means])
    assert "reward/components/model" in rows[0] and "reward/components/fours" in rows[0]
    assert rows[0]["reward/mean"] == rows[0]["reward/components/model"]     # weight 1.0 (+ 0.0 x fours)
    first, last = sum(means[:3]) / 3, sum(means[-3:]) / 3
    assert last > first + 0.1, means
    plan = json.loads((run_dir / "plan.json").read_text())
    assert [r["name"] for r in plan["roles"]] == ["actor", "reward_model"]
