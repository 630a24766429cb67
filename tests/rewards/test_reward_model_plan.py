"""Reward model in the plan and the memory planner; routing and combining components;
the judge's parse rules; re-rendering in the reward model's own chat template."""
import pytest
import torch

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import resolve_plan
from megatron_rl.rewards.config import RewardConfig, RewardModelConfig
from megatron_rl.rewards.judge import JudgeError, parse_score
from megatron_rl.rewards.manager import RewardManager
from tests.rewards.test_reward_model import make_tiny_rm


def test_plan_lists_reward_model_and_memory_counts_it(tmp_path):
    rm = make_tiny_rm(tmp_path / "rm", "llama")
    base = ["model.path=llama3-8b", "data.train_batch_size=8", "actor.mini_batch_size=8", "rollout.n=4"]
    without = resolve_plan(load_experiment_config(None, base), world_size=8, device="cuda", shape="llama3-8b")
    cfg = load_experiment_config(None, base + [f"reward.model.path={rm}", "reward.model.micro_batch_size=2"])
    plan = resolve_plan(cfg, world_size=8, device="cuda", shape="llama3-8b")
    role = plan.role("reward_model")
    assert (role.trainable, role.placement, role.micro_batch_size) == (False, "gpu", 2)
    assert role.shape.hidden_size == 64
    c = plan.memory.components_gib
    assert c["reward model"] > 0 and "reward" in plan.memory.phases_gib
    assert plan.memory.phases_gib["train"] > without.memory.phases_gib["train"]     # resident weights
    off = resolve_plan(load_experiment_config(None, base + [f"reward.model.path={rm}", "reward.model.offload=true"]),
                       world_size=8, device="cuda", shape="llama3-8b")
    assert off.role("reward_model").placement == "host_offload"
    assert off.memory.phases_gib["train"] == pytest.approx(without.memory.phases_gib["train"])


def test_combine_weighted_sum_and_model_routing():
    cfg = RewardConfig(name="format", num_workers=0, model=RewardModelConfig(path="/rm"),
                       combine={"format": 2.0, "model": 0.5})
    samples = [{"uid": "a"}, {"uid": "b"}]
    calls = []

    def scorer(rows):
        calls.append(list(rows))
        return [10.0 * (i + 1) for i in rows]
    res = RewardManager(cfg).score(["x", "y"], samples, scorer)
    fmt = [res.extras[i]["components"]["format"] for i in range(2)]
    assert res.scores == pytest.approx([2.0 * fmt[0] + 5.0, 2.0 * fmt[1] + 10.0])
    assert calls == [[0, 1]] and "reward/components/model" in res.metrics

    routed = RewardConfig(name="format", num_workers=0, model=RewardModelConfig(path="/rm"))
    rows = [{"uid": "a", "reward_model": {"style": "model"}}, {"uid": "b", "reward_model": {"style": "rule"}}]
    calls.clear()
    res = RewardManager(routed).score(["x", "y"], rows, scorer)
    assert calls == [[0]] and res.scores[0] == 10.0 and res.reward_names == ["model", "format"]


def test_judge_parse_rules():
    assert parse_score("regex:Score: (\\d+)", "Score: 7 of 10") == 7.0
    assert parse_score("json:verdict.score", 'ok {"verdict": {"score": 0.25}}') == 0.25
    for rule, text in (("regex:(\\d+)", "none"), ("json:score", "{bad"), ("json:score", '{"score": "high"}')):
        with pytest.raises(JudgeError):
            parse_score(rule, text)


def test_chat_template_rerender(tmp_path):
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rewards.reward_model import load_reward_model, resolve_template
    from tests.trainer.conftest import write_tokenizer

    path = make_tiny_rm(tmp_path / "rm", "llama")
    write_tokenizer(path)
    init_distributed()
    rm = load_reward_model(path, tokenizer=True)
    assert resolve_template("auto", rm.tokenizer, None) == "chat"
    ids, am = rm.render([[{"role": "user", "content": "what is two plus two ?"}]] * 2, ["", ""], ["4", "no yes"],
                        "chat")
    text = rm.tokenizer.decode(ids[1][am[1] > 0].tolist())
    assert text.split()[-3:] == ["no", "yes", "<|im_end|>"] and am.sum(-1).tolist()[1] == am.sum(-1).tolist()[0] + 1
    assert rm.score(ids, am).shape == (2,)
