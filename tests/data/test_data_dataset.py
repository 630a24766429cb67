import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatron_rl.data import DataConfig, DataError, PromptLoader, RLDataset, collate_prompts, pad_token_id

# "<|im_start|> user {text} <|im_end|> <|im_start|> assistant" = 5 tokens around the text words.
WRAP = 5


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_plain_text_prompt_becomes_user_message_with_generation_prompt(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "what is one plus two ?", "ground_truth": "3"}])
    s = RLDataset([f], tokenizer, DataConfig())[0]
    assert s["messages"] == [{"role": "user", "content": "what is one plus two ?"}]
    assert s["prompt_text"].endswith("<|im_start|> assistant ")
    assert len(s["prompt_ids"]) == 6 + WRAP
    assert s["ground_truth"] == "3"


def test_chat_messages_and_extra_fields_are_kept(tmp_path, tokenizer):
    msgs = [{"role": "system", "content": "you are a calculator"}, {"role": "user", "content": "one plus two"}]
    f = write_jsonl(tmp_path / "t.jsonl", [{"q": msgs, "data_source": "gsm8k", "extra": {"k": [1, 2]}}])
    s = RLDataset([f], tokenizer, DataConfig(prompt_key="q"))[0]
    assert s["messages"] == msgs
    assert s["data_source"] == "gsm8k" and s["extra"] == {"k": [1, 2]}
    assert "q" not in s


def test_uid_is_file_name_and_line_across_several_files(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "one"}, "", {"prompt": "two"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "three", "uid": "mine"}])
    ds = RLDataset([a, b], tokenizer, DataConfig())
    assert [ds[i]["uid"] for i in range(len(ds))] == ["a.jsonl:1", "a.jsonl:3", "b.jsonl:1"]


def test_raw_text_without_chat_template(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "one plus two"}])
    s = RLDataset([f], tokenizer, DataConfig(use_chat_template=False))[0]
    assert s["prompt_text"] == "one plus two"
    assert s["prompt_ids"] == tokenizer.encode("one plus two")


def test_system_prompt_is_prepended(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "one"}])
    s = RLDataset([f], tokenizer, DataConfig(system_prompt="you are a calculator"))[0]
    assert [m["role"] for m in s["messages"]] == ["system", "user"]


def test_bad_json_line_names_file_and_line(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "one"}, '{"prompt": "two"'])
    with pytest.raises(DataError, match=r"t\.jsonl:2: bad JSON"):
        RLDataset([f], tokenizer, DataConfig())


def test_non_object_line_names_file_and_line(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"t\.jsonl:1: expected a JSON object, got list"):
        RLDataset([f], tokenizer, DataConfig())


def test_missing_prompt_key_names_file_and_line(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "one"}, {"question": "two"}])
    ds = RLDataset([f], tokenizer, DataConfig())
    with pytest.raises(DataError, match=r"t\.jsonl:2: missing prompt key 'prompt'.*question"):
        ds[1]


def test_wrong_prompt_type_names_file_and_line(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": 42}, {"prompt": [{"role": "user"}]}])
    ds = RLDataset([f], tokenizer, DataConfig())
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'prompt' must be .*got int"):
        ds[0]
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'prompt'"):
        ds[1]


LONG = "a b c d e f g h i j"  # 10 words -> 15 tokens with the template


def test_overlong_prompt_under_truncation_error_names_file_and_line(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a"}, {"prompt": LONG}])
    ds = RLDataset([f], tokenizer, DataConfig(max_prompt_length=8, truncation="error"))
    assert len(ds[0]["prompt_ids"]) == 6
    with pytest.raises(DataError, match=r"t\.jsonl:2: prompt has 15 tokens, more than max_prompt_length=8"):
        ds[1]


def test_left_truncation_keeps_last_tokens(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": LONG}])
    full = RLDataset([f], tokenizer, DataConfig())[0]["prompt_ids"]
    ids = RLDataset([f], tokenizer, DataConfig(max_prompt_length=8, truncation="left"))[0]["prompt_ids"]
    assert ids == full[-8:]


def test_right_truncation_keeps_first_tokens(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": LONG}])
    full = RLDataset([f], tokenizer, DataConfig())[0]["prompt_ids"]
    ids = RLDataset([f], tokenizer, DataConfig(max_prompt_length=8, truncation="right"))[0]["prompt_ids"]
    assert ids == full[:8]


def test_filter_overlong_prompts_drops_them_and_keeps_uids(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": LONG}, {"prompt": "a"}, {"prompt": LONG}, {"prompt": "b c"}])
    ds = RLDataset([f], tokenizer, DataConfig(max_prompt_length=8, filter_overlong_prompts=True))
    assert [ds[i]["uid"] for i in range(len(ds))] == ["t.jsonl:2", "t.jsonl:4"]


def test_filter_that_drops_everything_is_an_error(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": LONG}])
    with pytest.raises(DataError, match="all 1 prompts"):
        RLDataset([f], tokenizer, DataConfig(max_prompt_length=8, filter_overlong_prompts=True))


def test_unknown_truncation_policy_is_rejected():
    with pytest.raises(ValueError, match="error\\|left\\|right"):
        DataConfig(truncation="middle")


def test_missing_teacher_response_names_file_and_line(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "gold": "b c"}, {"prompt": "a"}])
    ds = RLDataset([f], tokenizer, DataConfig(teacher_response_key="gold"))
    assert ds[0]["teacher_response"] == "b c"
    with pytest.raises(DataError, match=r"t\.jsonl:2: teacher_response_key 'gold'"):
        ds[1]


def test_parquet_file_is_read_with_row_uids(tmp_path, tokenizer):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "one", "ground_truth": "1"},
                                         {"prompt": "two", "ground_truth": "2"}]), path)
    ds = RLDataset([str(path)], tokenizer, DataConfig())
    assert [ds[1]["uid"], ds[1]["ground_truth"]] == ["t.parquet:2", "2"]


def test_missing_file_and_unknown_suffix_are_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        RLDataset([str(tmp_path / "nope.jsonl")], tokenizer, DataConfig())
    (tmp_path / "t.csv").write_text("prompt\n")
    with pytest.raises(DataError, match=r"t\.csv: unknown data file type"):
        RLDataset([str(tmp_path / "t.csv")], tokenizer, DataConfig())


def test_collate_left_pads_with_pad_id(tokenizer):
    b = collate_prompts([{"prompt_ids": [7, 8, 9], "uid": "x:1"}, {"prompt_ids": [5], "uid": "x:2"}],
                        pad_token_id(tokenizer))
    assert b["prompt_ids"].tolist() == [[7, 8, 9], [1, 1, 5]]
    assert b["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.field("uid") == ["x:1", "x:2"] and "prompt_ids" not in b.samples[0]


def test_pad_id_falls_back_to_eos(tokenizer_no_pad):
    assert pad_token_id(tokenizer_no_pad) == tokenizer_no_pad.eos_token_id == 2


def test_prompt_loader_yields_batches_of_train_batch_size(tmp_path, tokenizer):
    tr = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a " * (i % 3 + 1)} for i in range(10)])
    va = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "b"} for _ in range(5)])
    loader = PromptLoader(DataConfig(train_files=[tr], val_files=[va], train_batch_size=4, val_batch_size=2),
                          tokenizer)
    b = loader.next_batch()
    assert b["prompt_ids"].shape[0] == 4 and b["prompt_ids"].dtype == torch.long
    assert loader.steps_per_epoch == 2
    assert [len(v) for v in loader.val_batches()] == [2, 2, 1]
