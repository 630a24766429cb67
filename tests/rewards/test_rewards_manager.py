import logging
import math
import textwrap

import pytest
import torch

from megatron_rl.rewards import RewardConfig, RewardManager, load_function, register_reward, to_token_rewards


@register_reward("test_fails_on_boom")
def _fails(response, sample):
    if response == "boom":
        raise RuntimeError("kaboom")
    return 1.0


@register_reward("test_slow")
def _slow(response, sample):
    if response == "slow":
        import time
        time.sleep(1.5)
    return 1.0


@register_reward("test_nan")
def _nan(response, sample):
    return math.nan


@register_reward("test_dict")
def _dict(response, sample):
    return {"score": 0.5, "token_weights": [0.0, 2.0], "acc": True}


def samples(n, **fields):
    return [{"uid": f"t.jsonl:{i + 1}", **fields} for i in range(n)]


def test_scores_and_metrics_from_gsm8k():
    with RewardManager(RewardConfig(name="gsm8k")) as m:
        r = m.score(["#### 7", "#### 3", "nope"], samples(3, ground_truth="7"))
    assert r.scores == [1.0, 0.0, 0.0]
    assert r.metrics["reward/mean"] == pytest.approx(1 / 3)
    assert r.metrics["reward/failures"] == 0.0 and r.metrics["reward/timeouts"] == 0.0


def test_failure_gets_fallback_counted_and_logged_with_uid(caplog):
    with RewardManager(RewardConfig(name="test_fails_on_boom", fallback_score=-1.0)) as m:
        with caplog.at_level(logging.WARNING):
            r = m.score(["ok", "boom"], samples(2))
    assert r.scores == [1.0, -1.0]
    assert r.metrics["reward/failures"] == 1.0
    assert "t.jsonl:2" in caplog.text and "kaboom" in caplog.text


def test_timeout_gets_fallback_and_is_counted_threads():
    cfg = RewardConfig(name="test_slow", num_workers=2, timeout_s=0.3, fallback_score=-2.0)
    with RewardManager(cfg) as m:
        r = m.score(["fast", "slow", "fast", "fast"], samples(4))
    assert r.scores == [1.0, -2.0, 1.0, 1.0]
    assert r.metrics["reward/timeouts"] == 1.0 and r.metrics["reward/failures"] == 0.0


def test_nan_score_raises_with_uid():
    with RewardManager(RewardConfig(name="test_nan")) as m:
        with pytest.raises(ValueError, match=r"returned nan for sample t\.jsonl:1"):
            m.score(["x"], samples(1))


def test_dict_return_splits_score_token_weights_and_extras():
    with RewardManager(RewardConfig(name="test_dict")) as m:
        r = m.score(["x"], samples(1))
    assert r.scores == [0.5] and r.token_weights == [[0.0, 2.0]] and r.extras == [{"acc": True}]


def test_selection_by_data_source_with_map_and_default():
    cfg = RewardConfig(name="gsm8k", select_by_data_source=True, data_source_map={"my_qa": "qa_em"})
    batch = [{"uid": "a:1", "data_source": "my_qa", "ground_truth": "Paris"},
             {"uid": "a:2", "data_source": "format"},
             {"uid": "a:3", "ground_truth": "7"}]
    responses = ["<answer>paris</answer>", "<think>x</think><answer>y</answer>", "#### 7"]
    with RewardManager(cfg) as m:
        r = m.score(responses, batch)
    assert r.reward_names == ["qa_em", "format", "gsm8k"] and r.scores == [1.0, 1.0, 1.0]


def test_unknown_data_source_names_uid():
    with RewardManager(RewardConfig(select_by_data_source=True)) as m:
        with pytest.raises(ValueError, match=r"sample a:1: no reward for data_source 'zzz'"):
            m.score(["x"], [{"uid": "a:1", "data_source": "zzz"}])


def test_kwargs_reach_the_reward():
    cfg = RewardConfig(name="gsm8k", kwargs={"gsm8k": {"format_score": 0.25}})
    with RewardManager(cfg) as m:
        assert m.score(["#### 1"], samples(1, ground_truth="2")).scores == [0.25]


# --- custom functions ----------------------------------------------------
USER_FILE = textwrap.dedent("""
    def length_reward(response, sample, scale=1.0):
        return scale * len(response)

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return float(solution_str == ground_truth)
""")


def test_custom_function_from_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    cfg = RewardConfig(name="len", custom_functions={"len": f"{path}:length_reward"}, kwargs={"len": {"scale": 2}})
    with RewardManager(cfg) as m:
        assert m.score(["abc"], samples(1)).scores == [6.0]


def test_custom_verl_style_function_from_file(tmp_path):
    path = tmp_path / "verl_style.py"
    path.write_text(USER_FILE)
    cfg = RewardConfig(name="verl_em", custom_functions={"verl_em": f"{path}:compute_score"})
    with RewardManager(cfg) as m:
        assert m.score(["42", "41"], samples(2, ground_truth="42")).scores == [1.0, 0.0]


def test_custom_function_from_module():
    fn = load_function("megatron_rl.rewards.qa:qa_exact_match")
    assert fn("<answer>a</answer>", "A") == 1.0


def test_bad_custom_function_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found: .*missing.py"):
        load_function(f"{tmp_path}/missing.py:f")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:f")
    with pytest.raises(AttributeError, match="has no attribute 'nope'.*qa_exact_match"):
        load_function("megatron_rl.rewards.qa:nope")
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_function("just_a_name")


def test_process_pool_loads_custom_function_and_kills_timed_out_worker(tmp_path):
    path = tmp_path / "proc_rewards.py"
    path.write_text("import time\n"
                    "def r(response, sample):\n"
                    "    if response == 'hang':\n"
                    "        time.sleep(60)\n"
                    "    if response == 'boom':\n"
                    "        raise ValueError('bad')\n"
                    "    return len(response)\n")
    cfg = RewardConfig(name="proc_r", custom_functions={"proc_r": f"{path}:r"}, executor="process",
                       num_workers=2, timeout_s=1.5, fallback_score=-1.0)
    with RewardManager(cfg) as m:
        r = m.score(["ab", "hang", "boom", "abcd"], samples(4))
    assert r.scores == [2.0, -1.0, -1.0, 4.0]
    assert r.metrics["reward/timeouts"] == 1.0 and r.metrics["reward/failures"] == 1.0


# --- token rewards -------------------------------------------------------
def test_to_token_rewards_puts_score_on_last_valid_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    out = to_token_rewards([2.0, -1.0, 5.0], mask)
    assert out.tolist() == [[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0]]
    assert out.dtype == torch.float32


def test_score_batch_sets_token_rewards_weights_and_sample_scores():
    from megatron_rl.data.batch import Batch
    batch = Batch({"response_mask": torch.tensor([[1.0, 1.0, 0.0]])}, samples(1))
    with RewardManager(RewardConfig(name="test_dict")) as m:
        m.score_batch(batch, ["x"])
    assert batch["token_rewards"].tolist() == [[0.0, 0.5, 0.0]]
    assert batch["token_weights"].tolist() == [[0.0, 2.0, 1.0]]
    assert batch.samples[0]["score"] == 0.5 and batch.samples[0]["reward_extras"] == {"acc": True}


def test_process_workers_import_modules_that_registered_rewards(tmp_path, monkeypatch):
    # a reward registered by decorator in an importable module (as the agent package does)
    pkg = tmp_path / "my_reward_pkg_xyz.py"
    pkg.write_text("from megatron_rl.rewards import register_reward\n"
                   "@register_reward('decorated_in_module_xyz')\n"
                   "def r(response, sample):\n"
                   "    return 3.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))      # spawned workers find it too
    import my_reward_pkg_xyz  # noqa: F401
    cfg = RewardConfig(name="decorated_in_module_xyz", executor="process", num_workers=1)
    with RewardManager(cfg) as m:
        r = m.score(["x"], samples(1))
    assert r.scores == [3.0] and r.metrics["reward/failures"] == 0.0
