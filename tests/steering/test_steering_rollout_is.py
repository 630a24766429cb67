"""`steering.logprob_mode: rollout_is`: truncated IS weights and the unsteered actor view."""
import math

import pytest
import torch

from megatron_rl.steering.rollout_is import UnsteeredTraining, is_metrics, truncated_is_weights


def test_is_weights_are_exp_old_minus_rollout_truncated_at_cap():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -4.0]])
    rollout = torch.tensor([[-1.0, -1.0, -2.5], [-3.5, -0.1, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, rollout, mask, cap=2.0)
    want = torch.tensor([[1.0, math.exp(-1.0), 2.0], [math.exp(0.5), 1.0, 0.0]])   # exp(2) -> 2; pad -> 0
    assert torch.allclose(w, want, atol=1e-6)
    m = is_metrics(w, old, rollout, mask, cap=2.0)
    assert m["rollout_is/frac_truncated"] == pytest.approx(1 / 5)
    assert m["rollout_is/weight_max"] == pytest.approx(2.0)
    assert m["rollout_is/weight_mean"] == pytest.approx(float(want.sum()) / 5, abs=1e-6)


def test_is_weights_reject_mismatched_shapes_and_bad_cap():
    with pytest.raises(ValueError, match="response_mask"):
        truncated_is_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4), cap=2.0)
    with pytest.raises(ValueError, match="rollout_is_cap"):
        truncated_is_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), cap=0.0)


def test_unsteered_view_removes_the_hook_inside_use_and_delegates_the_rest():
    events = []

    class Ctl:
        from contextlib import contextmanager

        @contextmanager
        def disabled(self):
            events.append("off")
            yield self
            events.append("on")

        def set_strengths(self, s):
            events.append(("strengths", s))

    view = UnsteeredTraining(Ctl())
    with view.use(torch.ones(2, 1), None):
        events.append("forward")
    view.set_strengths(3)
    assert events == ["off", "forward", "on", ("strengths", 3)]


def test_logprobs_phase_folds_is_weights_into_token_weights():
    from types import SimpleNamespace

    from megatron_rl.data.batch import Batch
    from megatron_rl.trainer import phases

    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])

    class Actor:                                          # the unsteered recompute
        routing_replay = None                             # no MoE router replay

        def compute_logprobs(self, batch, with_entropy=False):
            return old.clone(), torch.zeros_like(old)

    batch = Batch({"prompt_ids": torch.zeros(2, 1, dtype=torch.long), "response_ids": torch.zeros(2, 2, dtype=torch.long),
                   "response_mask": torch.ones(2, 2), "rollout_logprob": torch.tensor([[-1.5, -1.0], [-0.5, -3.5]]),
                   "token_weights": torch.tensor([[0.5, 1.0], [1.0, 2.0]])}, [{}, {}])
    from megatron_rl.algos.off_policy import OffPolicyConfig

    cfg = SimpleNamespace(rollout=SimpleNamespace(logprob_mode="recompute"), algos=SimpleNamespace(off_policy=OffPolicyConfig()),
                          steering=SimpleNamespace(enable=True, logprob_mode="rollout_is", rollout_is_cap=2.0))
    metrics = phases.logprobs(SimpleNamespace(cfg=cfg, actor=Actor(), reference=None), batch)
    w = torch.tensor([[math.exp(0.5), math.exp(-1.0)], [1.0, 2.0]])                  # exp(3) capped at 2
    assert torch.allclose(batch["rollout_is_weights"], w, atol=1e-6)
    assert torch.allclose(batch["token_weights"], torch.tensor([[0.5, 1.0], [1.0, 2.0]]) * w, atol=1e-6)
    assert metrics["rollout_is/frac_truncated"] == pytest.approx(0.25)
