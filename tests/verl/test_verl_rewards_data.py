"""verl's data schema, reward signature and scorers: ground truth from reward_model, the row's
own extra_info, dict extras as metrics, verl_default dispatch, DAPO's math rule, clip-higher."""
import pytest
import torch

from megatron_rl.data.readers import DataError, Record
from megatron_rl.data.verl_schema import check_record, route_of, verl_fields
from megatron_rl.rewards import RewardConfig, RewardManager
from megatron_rl.rewards.dapo import dapo_math_score, normalize_final_answer
from tests.verl.conftest import verl_gsm8k_rows


def test_verl_row_takes_ground_truth_from_reward_model():
    row = verl_gsm8k_rows(2, "train")[1]
    fields = verl_fields(Record("train.parquet", 2, row))
    assert fields["ground_truth"] == "5" and fields["extra_info"]["index"] == 1
    top = verl_fields(Record("x", 1, {**row, "ground_truth": "9"}))
    assert top["ground_truth"] == "9"                       # a top-level one wins


def test_video_column_is_refused_by_name():
    with pytest.raises(DataError, match=r"x.parquet:3: column 'videos'"):
        check_record(Record("x.parquet", 3, {"prompt": "hi", "videos": [{"bytes": b"..."}]}))
    check_record(Record("x.parquet", 3, {"prompt": "hi", "videos": None}))   # an empty column is fine
    check_record(Record("x.parquet", 3, {"prompt": "<image>hi", "images": [{"bytes": b"..."}]}))  # data.image


def test_route_of_and_model_rows_refused():
    assert route_of({"reward_model": {"style": "rule"}}) == "rule" and route_of({}) == "rule"
    assert route_of({"reward_model": {"style": "model"}}) == "model"
    with RewardManager(RewardConfig(name="gsm8k", num_workers=0)) as m:
        with pytest.raises(ValueError, match="reward_model.style=model but neither reward.model.path"):
            m.score(["#### 4"], [{"uid": "u7", "ground_truth": "4", "reward_model": {"style": "model"}}])


VERL_FN = '''
CALLS = []
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    CALLS.append((data_source, solution_str, ground_truth, extra_info))
    return {"score": float(ground_truth in solution_str), "acc": ground_truth in solution_str, "pred": "x"}
'''


def test_verl_signature_gets_row_extra_info_and_extras_become_metrics(tmp_path):
    f = tmp_path / "verl_reward.py"
    f.write_text(VERL_FN)
    cfg = RewardConfig(name="mine", custom_functions={"mine": f"{f}:compute_score"}, num_workers=0)
    rows = [verl_fields(Record("t", i + 1, r)) for i, r in enumerate(verl_gsm8k_rows(3, "train"))]
    with RewardManager(cfg) as m:
        res = m.score(["#### 4", "#### 4", "#### 6"], rows)
    from megatron_rl.rewards.loader import load_function
    calls = load_function(f"{f}:compute_score").__globals__["CALLS"]
    assert calls[1] == ("openai/gsm8k", "#### 4", "5", rows[1]["extra_info"])
    assert res.scores == [1.0, 0.0, 0.0]
    acc = res.metrics["reward_extra/acc/mean"]
    assert float(acc) == pytest.approx(1 / 3) and acc.count == 3
    assert "reward_extra/pred/mean" not in res.metrics      # strings stay per-sample info


def test_verl_default_dispatches_by_data_source_and_names_unknown_ones():
    samples = [{"data_source": "openai/gsm8k", "ground_truth": "72"},
               {"data_source": "lighteval/MATH", "ground_truth": "\\frac{1}{2}"},
               {"data_source": "math_dapo", "ground_truth": "34"},
               {"data_source": "aime_2024", "ground_truth": "204"},
               {"data_source": "searchR1_nq", "ground_truth": {"target": ["Paris"]}}]
    responses = ["so #### 72", "thus \\boxed{\\dfrac{1}{2}}", "Answer: 34", "Answer: 203",
                 "<answer> paris </answer>"]
    with RewardManager(RewardConfig(name="verl_default", num_workers=0)) as m:
        assert m.score(responses, samples).scores == [1.0, 1.0, 1.0, -1.0, 1.0]
        with pytest.raises(ValueError, match=r"no rule for data_source 'codecontests'"):
            m.score(["x"], [{"uid": "a", "data_source": "codecontests", "ground_truth": "1"}])


@pytest.mark.parametrize("response,truth,correct", [
    ("... so the result is 12.\nAnswer: 12", "12", True),
    ("answer : $\\frac{3}{4}$", "\\frac34", True),           # shorthand frac, $ stripped, case-insensitive
    ("Answer: x = 1,000", "1000", True),                       # right of '=', grouping comma
    ("Answer: 5 degrees", "5", True),                          # unit words removed
    ("Answer: \\boxed{7}", "7", True),
    ("Answer: 13", "12", False),
    ("the answer is 12", "12", False),                         # no 'Answer:' -> invalid
])
def test_dapo_math_rule(response, truth, correct):
    out = dapo_math_score(response, truth)
    assert out["acc"] is correct and out["score"] == (1.0 if correct else -1.0)


def test_dapo_normalisation_and_search_window():
    assert normalize_final_answer("\\text{(A)}") == "(A)"
    assert dapo_math_score("Answer: 9\n" + "x" * 250, "9")["acc"] is True          # within the last 300 chars
    assert dapo_math_score("Answer: 9\n" + "x" * 400, "9")["acc"] is False        # only the last 300 chars


def test_clip_high_is_dapo_clip_higher():
    """DAPO eq. 10: clip(r, 1 - eps_low, 1 + eps_high); with eps_high=0.28 a positive-advantage
    token keeps its gradient up to r=1.28 (clipped at 1.2 under symmetric PPO)."""
    from megatron_rl.algos.policy_loss import ppo_policy_loss

    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.25, 1.3, 0.75]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, _ = ppo_policy_loss(old, new, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=None)
    # per token: -1.25 (inside), -1.28 (clipped high), +0.8 (clipped low: max(0.75, 0.8))
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3, rel=1e-5)
