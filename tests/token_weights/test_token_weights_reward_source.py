"""`token_weights.source: reward`: validation names the sample; missing weights warn once or fail."""
import logging

import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.token_weights import TokenWeightsConfig
from megatron_rl.token_weights.phase import RewardWeights


def batch_with(weights=None):
    t = {"response_mask": torch.ones(3, 2), "advantages": torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])}
    if weights is not None:
        t["token_weights"] = torch.tensor(weights)
    return Batch(t, [{"uid": "q0-0"}, {"uid": "q0-1"}, {"uid": "q1-0"}])


@pytest.mark.parametrize("bad,value", [(-0.5, "-0.5"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_bad_weight_error_names_sample_uid_and_token(bad, value):
    with pytest.raises(ValueError, match=rf"sample 1 \(uid q0-1\) at response token 1 is {value}"):
        RewardWeights(TokenWeightsConfig(source="reward"))(None, batch_with([[1.0, 1.0], [1.0, bad], [1.0, 1.0]]))


def test_integer_weights_are_refused():
    b = batch_with()
    b["token_weights"] = torch.ones(3, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="floating point"):
        RewardWeights(TokenWeightsConfig(source="reward"))(None, b)


def test_missing_weights_warn_once(caplog):
    phase = RewardWeights(TokenWeightsConfig(source="reward", missing="warn_once"))
    with caplog.at_level(logging.WARNING):
        m1 = phase(None, batch_with())
        m2 = phase(None, batch_with())
    assert m1 == m2 == {"token_weights/missing": 1.0}
    assert sum("no reward function returned 'token_weights'" in r.message for r in caplog.records) == 1


def test_missing_weights_error_names_first_samples():
    with pytest.raises(ValueError, match=r"first uids \['q0-0', 'q0-1', 'q1-0'\]"):
        RewardWeights(TokenWeightsConfig(source="reward", missing="error"))(None, batch_with())


def test_valid_weights_give_metrics():
    m = RewardWeights(TokenWeightsConfig(source="reward"))(None, batch_with([[0.5, 1.5], [1.0, 1.0], [2.0, 0.0]]))
    assert m["token_weights/mean"] == pytest.approx(1.0)
    assert m["token_weights/min"] == 0.0 and m["token_weights/max"] == 2.0
    assert m["token_weights/missing"] == 0.0
