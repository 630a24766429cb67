"""`algos.off_policy`: truncated IS (tis) and band masking (mis) of old against rollout log-probs,
by hand; the plan forces the old-log-prob pass and refuses what cannot work; a GRPO step with tis
and rollout == old log-probs equals correction=none exactly; mis equals masking those tokens by hand."""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.algos import actor_loss
from megatron_rl.algos.off_policy import (OffPolicyConfig, band_mask_weights, importance_ratio,
                                          off_policy_weights, truncated_is_weights)
from megatron_rl.data.batch import Batch

OLD = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-3.0, -0.1, -4.0, -2.0]])
ROLLOUT = torch.tensor([[-1.0, -1.0, -2.5, -1.2], [-3.5, -0.1, -1.0, -2.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])      # 7 valid tokens
# log ratios old - rollout: [0, -1, 2, 0.2] and [0.5, 0, -3, (pad)]


def test_tis_token_weights_are_exp_ratio_truncated_at_cap():
    w = truncated_is_weights(OLD, ROLLOUT, MASK, cap=2.0)
    want = torch.tensor([[1.0, math.exp(-1), 2.0, math.exp(0.2)], [math.exp(0.5), 1.0, math.exp(-3), 0.0]])
    assert torch.allclose(w, want, atol=1e-6)
    st = off_policy_weights(OffPolicyConfig("tis", cap=2.0), OLD, ROLLOUT, MASK).stats
    assert st.tokens == 7 and st.masked_frac == 0.0
    assert st.truncated_frac == pytest.approx(1 / 7)                    # exp(2) > 2
    assert st.weight_mean == pytest.approx(float(want.sum()) / 7, abs=1e-6)
    assert st.weight_max == pytest.approx(2.0)


def test_tis_sequence_level_uses_each_rows_geometric_mean_ratio():
    w = truncated_is_weights(OLD, ROLLOUT, MASK, cap=1.2, level="sequence")
    row0, row1 = math.exp((0 - 1 + 2 + 0.2) / 4), math.exp((0.5 + 0 - 3) / 3)   # e^0.3 = 1.35 -> cap 1.2
    want = torch.tensor([[min(row0, 1.2)] * 4, [row1] * 3 + [0.0]])
    assert torch.allclose(w, want, atol=1e-6)
    rho = importance_ratio(OLD, ROLLOUT, MASK, "sequence")
    assert rho[0, 0].item() == pytest.approx(row0, rel=1e-6)


def test_mis_masks_tokens_outside_the_band():
    w = band_mask_weights(OLD, ROLLOUT, MASK, (0.5, 2.0))
    # ratios 1, e^-1=0.37 (out), e^2 (out), e^0.2 | e^0.5=1.65, 1, e^-3 (out), pad
    want = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(w, want)
    st = off_policy_weights(OffPolicyConfig("mis", band=[0.5, 2.0]), OLD, ROLLOUT, MASK).stats
    assert st.masked_frac == pytest.approx(3 / 7) and st.weight_mean == pytest.approx(4 / 7)
    assert st.weight_max == 1.0 and st.truncated_frac == 0.0
    seq = band_mask_weights(OLD, ROLLOUT, MASK, (0.5, 2.0), level="sequence")   # e^0.3 in, e^(-2.5/3)=0.43 out
    assert torch.equal(seq, torch.tensor([[1.0] * 4, [0.0] * 4]))


def test_none_gives_the_mask_and_config_errors_name_the_key():
    out = off_policy_weights(OffPolicyConfig(), OLD, ROLLOUT, MASK)
    assert torch.equal(out.weights, MASK)
    for kw, key in ((dict(correction="is"), "algos.off_policy.correction"), (dict(cap=0.0), "algos.off_policy.cap"),
                    (dict(band=[2.0, 1.0]), "algos.off_policy.band"), (dict(band=[1.0]), "algos.off_policy.band"),
                    (dict(level="row"), "algos.off_policy.level")):
        with pytest.raises(ValueError, match=key):
            OffPolicyConfig(**kw)
    with pytest.raises(ValueError, match="response_mask"):
        truncated_is_weights(OLD, ROLLOUT, MASK[:, :3], cap=2.0)


def test_config_section_loads_from_overrides():
    from megatron_rl.config import load_experiment_config

    cfg = load_experiment_config(None, ["model.path=none", "algos.off_policy.correction=mis",
                                        "algos.off_policy.band=[0.8,1.25]", "algos.off_policy.level=sequence"])
    assert cfg.algos.off_policy == OffPolicyConfig("mis", band=[0.8, 1.25], level="sequence")


def _plan(*overrides):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import resolve_plan

    cfg = load_experiment_config(None, ["model.path=none", "data.train_batch_size=4", "rollout.n=2", *overrides])
    return resolve_plan(cfg, world_size=1, device="cpu")


def test_plan_forces_the_old_logprob_pass_and_refuses_rollout_logprobs_by_name():
    from megatron_rl.plan import PlanError

    assert _plan().old_logprob.source == "update_forward"                       # on-policy: pass skipped
    p = _plan("algos.off_policy.correction=tis")
    assert p.old_logprob.separate_pass and "algos.off_policy.correction=tis" in p.old_logprob.reason
    assert p.rollout.engine_logprobs and "algos.off_policy.correction=tis" in p.rollout.engine_logprobs_reason
    with pytest.raises(PlanError, match="steering.logprob_mode=rollout_is"):
        _plan("algos.off_policy.correction=tis", "steering.enable=true", "steering.feature_idxs=[3]",
              "steering.logprob_mode=rollout_is")
    with pytest.raises(PlanError, match="algos.off_policy.correction=mis with rollout.logprob_mode=rollout"):
        _plan("algos.off_policy.correction=mis", "rollout.logprob_mode=rollout")


def _logprobs_phase(correction, old, rollout, mask, token_weights=None, **kw):
    from megatron_rl.trainer import phases

    class Actor:
        routing_replay = None                             # no MoE router replay

        def compute_logprobs(self, batch, with_entropy=False):
            return old.clone(), torch.zeros_like(old)

    tensors = {"prompt_ids": torch.zeros(len(old), 1, dtype=torch.long), "response_mask": mask.clone(),
               "response_ids": torch.zeros_like(old, dtype=torch.long), "rollout_logprob": rollout.clone()}
    if token_weights is not None:
        tensors["token_weights"] = token_weights.clone()
    batch = Batch(tensors, [{} for _ in range(len(old))])
    cfg = SimpleNamespace(rollout=SimpleNamespace(logprob_mode="recompute"), steering=SimpleNamespace(enable=False),
                          algos=SimpleNamespace(off_policy=OffPolicyConfig(correction, **kw)))
    metrics = phases.logprobs(SimpleNamespace(cfg=cfg, actor=Actor(), reference=None), batch)
    return batch, metrics


def test_logprobs_phase_folds_weights_into_token_weights_with_count_aware_metrics():
    from megatron_rl.logging.values import MeanOver

    tw = torch.full_like(OLD, 0.5)
    batch, m = _logprobs_phase("mis", OLD, ROLLOUT, MASK, tw, band=[0.5, 2.0])
    assert torch.equal(batch["token_weights"], 0.5 * band_mask_weights(OLD, ROLLOUT, MASK, (0.5, 2.0)))
    assert isinstance(m["off_policy/masked_frac"], MeanOver) and m["off_policy/masked_frac"].count == 7
    assert m["off_policy/masked_frac"] == pytest.approx(3 / 7) and m["off_policy/is_weight_max"] == 1.0
    assert m["off_policy/is_weight_mean"].count == 7


@pytest.mark.parametrize("apply_to", ["pg", "mask"])
def test_mis_loss_equals_the_loss_with_those_tokens_masked_by_hand(apply_to):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    rollout = old.clone()
    out = [(0, 1), (1, 4), (2, 0), (3, 5)]
    for (i, j), d in zip(out, (1.0, -1.0, 2.0, -0.8)):       # |log ratio| > log 2: outside [0.5, 2]
        rollout[i, j] -= d
    rollout[0, 2] -= 0.3                                     # inside the band: kept
    mask = torch.ones(4, 6)
    mask[3, 4:] = 0
    rollout[3, 5] = old[3, 5]                                # padding: nothing to mask
    out = out[:3]
    logprob = old + 0.1 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, 6, generator=g)
    batch, m = _logprobs_phase("mis", old, rollout, mask, band=[0.5, 2.0])
    assert m["off_policy/masked_frac"] == pytest.approx(3 / 22)
    kw = dict(agg_mode="token-mean", token_weights_apply_to=apply_to, entropy=torch.rand(4, 6, generator=g),
              entropy_coef=0.1, ref_logprob=old - 0.2, kl_coef=0.05)
    loss, _ = actor_loss(old, logprob, adv, mask, token_weights=batch["token_weights"], **kw)
    # by hand: "mask" drops the tokens from the loss mask; "pg" drops their policy-gradient term only
    hand_mask, hand_adv = mask.clone(), adv.clone()
    for i, j in out:
        if apply_to == "mask":
            hand_mask[i, j] = 0.0
        else:
            hand_adv[i, j] = 0.0
    want, _ = actor_loss(old, logprob, hand_adv, hand_mask, **kw)
    assert torch.allclose(loss, want, atol=1e-7, rtol=0), (loss, want)


class RolloutIsOldEngine:
    """The native engine, whose `rollout_logprob` is replaced by the actor's own recompute:
    the behaviour policy is exactly the trainer's, so every IS ratio is exactly 1."""

    def __init__(self, tr, inner):
        self.tr, self.inner = tr, inner

    def generate(self, batch, sampling):
        out = self.inner.generate(batch, sampling)
        out["rollout_logprob"] = self.tr.actor.compute_logprobs(out)[0].detach().clone()
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_grpo_step_with_tis_and_rollout_equal_old_equals_no_correction(tiny_run, tmp_path):  # noqa: F811
    from tests.trainer.test_onpolicy_and_options import max_diff, run

    overrides, _ = tiny_run
    one = ["trainer.total_steps=1", "algos.entropy_coef=0.5", "actor.recompute_old_logprob=always"]
    tr_none, w_none, rows_none = run(overrides, one + [f"logging.run_dir={tmp_path / 'none'}"], RolloutIsOldEngine)
    tr_tis, w_tis, rows_tis = run(overrides, one + ["algos.off_policy.correction=tis",
                                                    f"logging.run_dir={tmp_path / 'tis'}"], RolloutIsOldEngine)
    assert tr_tis.plan.old_logprob.separate_pass
    row = rows_tis[-1]
    assert row["off_policy/is_weight_mean"] == 1.0 and row["off_policy/is_weight_max"] == 1.0
    assert row["off_policy/truncated_frac"] == 0.0 and "off_policy/is_weight_mean" not in rows_none[-1]
    assert rows_none[-1]["actor/grad_norm"] > 0
    assert max_diff(w_none, w_tis) == 0.0
    for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert rows_none[-1][k] == rows_tis[-1][k], k


from tests.trainer.conftest import tiny_run  # noqa: E402,F401  (fixture)
