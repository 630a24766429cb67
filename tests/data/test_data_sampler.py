import pytest

from megatron_rl.data import ResumableSampler


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_resume_from_state_dict_continues_exactly():
    a = ResumableSampler(10, 3, shuffle=True, seed=7)
    take(a, 4)                       # into epoch 1 (3 batches per epoch)
    state = a.state_dict()
    expected = take(a, 5)
    b = ResumableSampler(10, 3, shuffle=True, seed=7)
    b.load_state_dict(state)
    assert take(b, 5) == expected


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = ResumableSampler(8, 4, shuffle=True, seed=0)
    e0, e1 = sum(take(s, 2), []), sum(take(s, 2), [])
    assert sorted(e0) == sorted(e1) == list(range(8))
    assert e0 != e1 and s.epoch == 1


def test_same_seed_same_order_and_no_shuffle_is_sequential():
    assert take(ResumableSampler(9, 3, seed=1), 3) == take(ResumableSampler(9, 3, seed=1), 3)
    assert take(ResumableSampler(5, 2, shuffle=False), 2) == [[0, 1], [2, 3]]


def test_drop_last_skips_short_batch_and_keep_last_returns_it():
    assert take(ResumableSampler(5, 2, shuffle=False), 3)[2] == [0, 1]
    assert take(ResumableSampler(5, 2, shuffle=False, drop_last=False), 3)[2] == [4]


def test_iter_yields_rest_of_epoch():
    s = ResumableSampler(6, 2, shuffle=False)
    s.next_batch()
    assert list(s) == [[2, 3], [4, 5]]


def test_resume_with_other_batch_size_is_refused():
    state = ResumableSampler(10, 3).state_dict()
    with pytest.raises(ValueError, match="batch_size=3"):
        ResumableSampler(10, 2).load_state_dict(state)


def test_dataset_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        ResumableSampler(3, 4)
