"""GAD building blocks on hand-made inputs: the Bradley-Terry loss, student/teacher
pairing, teacher tokenisation, missing teacher responses, reward normalisation."""
import math

import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.data.readers import DataError
from megatron_rl.trainer.discriminator import bt_loss, pair_with_teachers
from megatron_rl.trainer.gad import group_keys, normalise_rewards, split_missing_teacher, tokenize_teacher
from megatron_rl.trainer.gad_config import GADConfig


def test_bt_loss_and_accuracy_on_hand_made_scores():
    teacher = torch.tensor([2.0, 0.0, 1.0, -1.0])
    student = torch.tensor([0.0, 0.0, 3.0, -2.0])
    loss, acc = bt_loss(teacher, student)
    expected = sum(math.log1p(math.exp(-d)) for d in (2.0, 0.0, -2.0, 1.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == 0.5            # ties do not count as correct


def test_bt_loss_gradient_pushes_teacher_up_and_student_down():
    teacher = torch.tensor([0.5], requires_grad=True)
    student = torch.tensor([0.5], requires_grad=True)
    bt_loss(teacher, student)[0].backward()
    assert teacher.grad.item() == pytest.approx(-0.5) and student.grad.item() == pytest.approx(0.5)


def test_n_students_per_prompt_share_their_prompts_teacher():
    prompts = Batch({"prompt_ids": torch.zeros(3, 2, dtype=torch.long)},
                    [{"uid": "a.jsonl:1"}, {"uid": "a.jsonl:2"}, {"uid": "a.jsonl:3"}])
    students = [s["uid"] for s in prompts.samples for _ in range(2)]       # engine: group = uid, n=2
    pair = pair_with_teachers(students, group_keys(prompts))
    assert pair.tolist() == [0, 0, 1, 1, 2, 2]


def test_student_group_without_teacher_is_an_error():
    with pytest.raises(KeyError, match="x.jsonl:9"):
        pair_with_teachers(["x.jsonl:9"], ["x.jsonl:1"])


def test_teacher_tokens_get_eos_and_right_padding(gad_tokenizer):
    ids, mask = tokenize_teacher(gad_tokenizer, ["yes yes", "no"], max_tokens=8, pad_id=1)
    eos = gad_tokenizer.eos_token_id
    yes, no = gad_tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert ids.tolist() == [[yes, yes, eos], [no, eos, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert mask.dtype == torch.float32


def test_teacher_tokens_are_cut_at_max_tokens(gad_tokenizer):
    ids, mask = tokenize_teacher(gad_tokenizer, ["yes yes yes yes"], max_tokens=2, pad_id=1)
    assert ids.shape == (1, 2) and mask.sum().item() == 2


def test_missing_teacher_response_names_file_and_line():
    prompts = Batch({"prompt_ids": torch.zeros(2, 1, dtype=torch.long)},
                    [{"uid": "train.jsonl:1", "answer": "yes"}, {"uid": "train.jsonl:2"}])
    with pytest.raises(DataError, match="train.jsonl:2.*answer"):
        split_missing_teacher(prompts, "answer", skip=False)
    kept, skipped = split_missing_teacher(prompts, "answer", skip=True)
    assert skipped == 1 and [s["uid"] for s in kept.samples] == ["train.jsonl:1"]


def test_group_reward_norm_standardises_within_prompt():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0])
    out = normalise_rewards(scores, ["a", "a", "b", "b"], "group")
    assert out.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0], abs=1e-5)
    assert normalise_rewards(scores, ["a"] * 4, "none") is scores


def test_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="gad.reward_norm"):
        GADConfig(reward_norm="batch")
    with pytest.raises(ValueError, match="gad.warmup_student"):
        GADConfig(warmup_student="rl")
