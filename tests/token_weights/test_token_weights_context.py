"""Context / instruction masks from marker pairs, on an offline word-level tokenizer."""
import pytest
import torch

from megatron_rl.token_weights.context import ContextFinder, span_labels
from tests.helpers import write_word_tokenizer

WORDS = ["<document>", "</document>", "<", "document", ">", "</", "<|vision_start|>", "<|vision_end|>",
         "Anna", "lives", "in", "Rome", "where", "?", "img"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    import transformers

    d = tmp_path_factory.mktemp("tok")
    write_word_tokenizer(d, WORDS)
    return transformers.AutoTokenizer.from_pretrained(d)


def masks(tok, texts, markers, width):
    ids = [tok(t)["input_ids"] for t in texts]
    prompt_ids = torch.full((len(ids), width), tok.pad_token_id)
    prompt_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):                                  # left padding, as the batch has it
        prompt_ids[i, width - len(row):] = torch.tensor(row)
        prompt_mask[i, width - len(row):] = 1
    ctx, ins = ContextFinder(tok, markers)(prompt_ids, prompt_mask)
    return ctx.tolist(), ins.tolist()


def test_tokens_between_markers_are_context_the_rest_instruction(tok):
    ctx, ins = masks(tok, ["<document> Anna lives in Rome </document> where ?", "where ?"],
                     [["<document>", "</document>"]], 8)
    assert ctx == [[0, 1, 1, 1, 1, 0, 0, 0], [0] * 8]
    assert ins == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]     # markers and padding: neither


def test_markers_split_over_several_tokens_are_found(tok):
    ctx, ins = masks(tok, ["< document > Rome </ document > where"], [["<document>", "</document>"]], 8)
    assert ctx == [[0, 0, 0, 1, 0, 0, 0, 0]]
    assert ins == [[0, 0, 0, 0, 0, 0, 0, 1]]


def test_special_token_vision_span_and_unclosed_marker(tok):
    ctx, _ = masks(tok, ["where <|vision_start|> img img <|vision_end|> ?"],
                   [["<|vision_start|>", "<|vision_end|>"]], 6)
    assert ctx == [[0, 0, 1, 1, 0, 0]]
    ctx, _ = masks(tok, ["where <document> Anna Rome"], [["<document>", "</document>"]], 4)
    assert ctx == [[0, 0, 1, 1]]                                      # a truncated document runs to the end


def test_span_labels_marks_a_token_straddling_a_marker_as_marker():
    is_ctx, is_marker = span_labels(["x", "<doc", ">ab", "c", "</doc>"], [("<doc>", "</doc>")])
    assert is_ctx == [False, False, False, True, False]
    assert is_marker == [False, True, True, False, True]
