"""The discriminator at TP=2 and at PP=2 (two gloo processes) gives the same scores,
Bradley-Terry loss, accuracy and grad norm as TP=1, and the same scores after one update."""
import pytest
import torch

from tests.gad.parallel_workers import _discriminator_step
from tests.helpers import make_tiny_hf, run_multiproc


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_discriminator_step_matches_tp1(tmp_path, tp, pp):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    run_multiproc(_discriminator_step, 1, (hf, 1, 1, str(tmp_path / "ref.pt")))
    run_multiproc(_discriminator_step, 2, (hf, tp, pp, str(tmp_path / "par.pt")))
    ref, par = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "par.pt")
    assert ref["student"].shape == (4,) and ref["teacher"].shape == (2,)
    assert (ref["student"] - par["student"]).abs().max() < 1e-5
    assert (ref["teacher"] - par["teacher"]).abs().max() < 1e-5
    for k in ("critic/d_loss", "critic/d_acc", "critic/d_grad_norm",
              "critic/student_value_mean", "critic/teacher_value_mean"):
        assert par["metrics"][k] == pytest.approx(ref["metrics"][k], rel=1e-5, abs=1e-5), k
    assert ref["metrics"]["critic/d_grad_norm"] > 0
    # the update moved the scores, and by the same amount in both layouts
    assert (ref["after"] - ref["student"]).abs().max() > 1e-3
    assert (ref["after"] - par["after"]).abs().max() < 1e-4
