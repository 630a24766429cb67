"""DAPO dynamic sampling, overlong shaping and truncation masking on hand-made batches."""
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.plan.sampling import SamplingPlan
from megatron_rl.trainer import dynamic_sampling
from megatron_rl.rewards.length_shaping import mask_truncated, shape_overlong, truncated_rows
from tests.helpers import run_multiproc

EOS, PAD = 2, 1


def scored_round(scores_per_group: list[list[float]], tag: str, width: int = 3) -> Batch:
    """A rolled-out, scored batch: one group per list, one row per score."""
    rows = [(g, s) for g, scores in enumerate(scores_per_group) for s in scores]
    n = len(rows)
    samples = [{"uid": f"{tag}:{g}", "group": f"{tag}:{g}", "score": s} for g, s in rows]
    return Batch({"prompt_ids": torch.full((n, 2), 5), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
                  "response_ids": torch.full((n, width), 7), "response_mask": torch.ones(n, width),
                  "token_rewards": torch.zeros(n, width)}, samples)


class FakeTrainer:
    """`rollout_round` hands out scripted rounds; `plan.sampling` as the plan resolves it."""

    def __init__(self, rounds: list[Batch], groups: int, n: int, cap: int):
        self.rounds, self.calls = rounds, 0
        self.plan = SimpleNamespace(sampling=SamplingPlan(True, "score", cap, groups, groups * n, 0, False))
        self.data = SimpleNamespace(pad_id=PAD)

    def rollout_round(self, step, round_):
        assert round_ == self.calls
        self.calls += 1
        return self.rounds[round_], {"reward/mean": float(round_)}


def zero_variance_in_loss(batch: Batch) -> int:
    bad = 0
    for rows in dynamic_sampling.groups_of(batch):
        scores = {batch.samples[i]["score"] for i in rows}
        live = batch["response_mask"][rows].sum() > 0
        bad += int(len(scores) == 1 and bool(live))
    return bad


def test_keeps_generating_until_the_step_has_its_groups():
    rounds = [scored_round([[1, 1], [0, 1], [0, 0]], "a"), scored_round([[1, 1], [1, 0], [0, 1]], "b")]
    tr = FakeTrainer(rounds, groups=3, n=2, cap=5)
    batch, m = dynamic_sampling.collect(tr, step=1)
    assert tr.calls == 2 and len(batch) == 6                       # the plan's 3 groups x n=2
    assert zero_variance_in_loss(batch) == 0
    assert [batch.samples[i]["group"] for i in (0, 2, 4)] == [(0, "a:1"), (1, "b:1"), (1, "b:2")]
    assert m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/cap_hit"] == 0
    assert (m["dynamic_sampling/kept_groups"], m["dynamic_sampling/dropped_groups"]) == (3, 3)
    assert m["dynamic_sampling/filler_groups"] == 0 and m["reward/mean"] == 0.0    # first round's rewards
    assert float(m["dynamic_sampling/trained_reward_mean"]) == pytest.approx(0.5)


def test_surplus_groups_are_dropped_and_widths_padded():
    rounds = [scored_round([[0, 1]], "a", width=2), scored_round([[1, 0], [0, 1], [1, 0]], "b", width=4)]
    batch, m = dynamic_sampling.collect(FakeTrainer(rounds, groups=2, n=2, cap=0), step=1)
    assert len(batch) == 4 and batch["response_ids"].shape[1] == 4
    assert batch["response_ids"][0, 2:].tolist() == [PAD, PAD] and batch["response_mask"][0].tolist() == [1, 1, 0, 0]
    assert m["dynamic_sampling/kept_groups"] == 4


def test_cap_fills_with_masked_groups_and_says_so():
    rounds = [scored_round([[1, 1], [0, 1]], "a"), scored_round([[0, 0], [1, 1]], "b")]
    batch, m = dynamic_sampling.collect(FakeTrainer(rounds, groups=2, n=2, cap=2), step=1)
    assert len(batch) == 4 and m["dynamic_sampling/cap_hit"] == 1 and m["dynamic_sampling/filler_groups"] == 1
    assert batch["response_mask"][:2].sum() == 6 and batch["response_mask"][2:].sum() == 0   # filler out of the loss
    assert zero_variance_in_loss(batch) == 0


def test_filter_on_a_reward_extra_key():
    b = scored_round([[1, -1], [-1, -1]], "a")
    for s in b.samples:
        s["reward_extras"] = {"acc": s["score"] > 0}
    kept, dropped = dynamic_sampling.split_by_signal(b, "acc")
    assert kept == [[0, 1]] and dropped == [[2, 3]]
    with pytest.raises(KeyError, match="metric='pred'"):
        dynamic_sampling.split_by_signal(b, "pred")


def _lockstep_worker(rank, world):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    # rank 0 has its 1 group after round 1; rank 1 only in round 3: both must run 3 rounds
    script = {0: [[[0, 1]], [[1, 1]], [[1, 1]]], 1: [[[1, 1]], [[0, 0]], [[1, 0]]]}[rank]
    tr = FakeTrainer([scored_round(g, f"r{rank}.{i}") for i, g in enumerate(script)], groups=1, n=2, cap=5)
    batch, m = dynamic_sampling.collect(tr, step=1)
    assert tr.calls == 3 and m["dynamic_sampling/rounds"] == 3 and len(batch) == 2
    assert zero_variance_in_loss(batch) == 0 and m["dynamic_sampling/cap_hit"] == 0
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_dp_ranks_generate_the_same_number_of_rounds():
    run_multiproc(_lockstep_worker, world=2)


# --- overlong shaping and truncation masking ---------------------------------------------------
def responses(rows: list[list[int]], width: int = 8) -> Batch:
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return Batch({"response_ids": ids, "response_mask": mask}, [{"uid": str(i)} for i in range(len(rows))])


def test_overlong_penalty_is_dapos_linear_buffer():
    # max 8 tokens, buffer 4: no penalty up to 4 tokens, then -0.25 per token to -1 at 8 (factor 1)
    b = responses([[7] * 3, [7] * 4, [7] * 6, [7] * 8])
    shaped, m = shape_overlong(b, [1.0, 1.0, 1.0, 1.0], max_new_tokens=8, buffer_len=4, penalty_factor=1.0)
    assert shaped == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert [s["score"] for s in b.samples] == pytest.approx(shaped)
    assert b["token_rewards"][2].tolist() == pytest.approx([0, 0, 0, 0, 0, 0.5, 0, 0])   # on the last token
    _, m = shape_overlong(responses([[7] * 8]), [0.0], 8, 4, penalty_factor=0.5)
    assert float(m["reward/overlong_penalty_mean"]) == pytest.approx(-0.5)


def test_truncated_responses_leave_the_loss():
    # full length without EOS: truncated; full length ending in EOS: finished; short: finished
    b = responses([[7] * 8, [7] * 7 + [EOS], [7, 7, EOS], [7] * 5])
    assert truncated_rows(b, 8, [EOS]).tolist() == [True, False, False, False]
    m = mask_truncated(b, 8, [EOS])
    assert b["response_mask"].sum(-1).tolist() == [0, 8, 3, 5]
    assert float(m["response_length/truncated_frac"]) == pytest.approx(0.25) and b.samples[0]["truncated"]
