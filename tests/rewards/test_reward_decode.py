"""The reward path's batched decode (rewards/decode.py) gives exactly the per-row
`tokenizer.decode(..., skip_special_tokens=True)` text, right-padded or with holes."""
import types
from pathlib import Path

import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rewards.decode import decode_responses, response_token_lists
from megatron_rl.rewards.registry import call_reward

TOK = Path(__file__).resolve().parents[2] / ".gl" / "tok"


def _batch(mask):
    ids = torch.randint(0, 49152, mask.shape, generator=torch.Generator().manual_seed(0))
    ids[0, 1] = 2                                                    # a special token (SmolLM2's <|im_end|>)
    return Batch({"response_ids": ids, "response_mask": mask.float(), "response_attention_mask": mask.long()},
                 [{} for _ in range(mask.shape[0])])


def test_reward_response_token_lists_right_padded_and_with_holes():
    right = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    b = _batch(right)
    ids = b["response_ids"]
    assert response_token_lists(b) == [ids[0, :2].tolist(), ids[1].tolist(), []]
    holes = _batch(torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]]))
    assert response_token_lists(holes)[0] == [holes["response_ids"][0, 0].item(), holes["response_ids"][0, 2].item()]


@pytest.mark.skipif(not (TOK / "tokenizer.json").exists(), reason="SmolLM2 tokenizer not staged in .gl/tok")
def test_reward_batched_decode_equals_per_row_decode():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOK)
    b = _batch((torch.arange(64)[None] < torch.tensor([64, 10, 0, 33])[:, None]).long())
    expected = [tok.decode(r, skip_special_tokens=True) for r in response_token_lists(b)]
    assert decode_responses(tok, b) == expected


def test_reward_decode_falls_back_to_decode_without_a_fast_backend():
    tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: f"{len(ids)}:{skip_special_tokens}")
    assert decode_responses(tok, _batch(torch.tensor([[1, 1, 0], [1, 0, 0]]))) == ["2:True", "1:True"]


def test_reward_call_reward_reads_each_signature_once_and_takes_verl_functions():
    def ours(response, sample):
        return len(response)

    def verl(data_source, solution_str, ground_truth, extra_info=None):
        return f"{data_source}:{solution_str}:{ground_truth}"

    class Unhashable:
        __hash__ = None

        def __call__(self, response, sample):
            return 1.0

    sample = {"data_source": "d", "ground_truth": "g"}
    assert [call_reward(ours, "abc", sample, {}) for _ in range(2)] == [3, 3]
    assert call_reward(verl, "abc", sample, {}) == "d:abc:g"
    assert call_reward(Unhashable(), "abc", sample, {}) == 1.0
