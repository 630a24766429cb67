"""Image prompts (data/multimodal.py): the dataset's ids and pixels equal the Qwen2-VL
processor's, images ride in the sample through select/collate into micro-batches, and bad
rows are errors that name the file, row and image."""
import pytest
import torch

from megatron_rl.data import Batch, DataConfig, DataError, RLDataset, collate_prompts
from megatron_rl.data.config import ImageConfig
from megatron_rl.data.multimodal import ImageBatch, ImageInputs, VisionTokens
from megatron_rl.data.writers import write_jsonl
from tests.models.vl_fixtures import process_vl, tiny_images, tiny_qwen2_5_vl

Q = "how many red circles are there in the image ?"


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl"))


@pytest.fixture(scope="module")
def tok(vl_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(vl_dir)


def _rows(tmp_path, rows, name="t.jsonl"):
    (tmp_path / "img").mkdir(exist_ok=True)
    for i, im in enumerate(tiny_images()):
        im.save(tmp_path / "img" / f"{i}.png")
    write_jsonl(tmp_path / name, rows)
    return str(tmp_path / name)


def test_image_prompt_ids_and_pixels_equal_the_processor(tmp_path, vl_dir, tok):
    f = _rows(tmp_path, [{"prompt": f"<image>{Q}", "images": ["img/0.png"], "ground_truth": "3"},
                         {"prompt": "describe the picture <image>", "images": ["img/1.png"]}])
    ds = RLDataset([f], tok, DataConfig(max_prompt_length=64))
    texts = [tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}],
                                     add_generation_prompt=True, tokenize=False)]
    ref = process_vl(vl_dir, texts, tiny_images()[:1])
    s = ds[0]
    assert s["prompt_ids"] == ref["input_ids"][0].tolist()
    assert isinstance(s["images"], ImageInputs) and s["ground_truth"] == "3"
    assert torch.equal(s["images"].pixel_values, ref["pixel_values"])
    assert s["images"].image_grid_thw.tolist() == [[1, 8, 8]]          # 32x32 px, patch 4 -> 16 pads
    pad = VisionTokens.of(tok).pad
    assert sum(t == pad for t in s["prompt_ids"]) == 16
    assert sum(t == pad for t in ds[1]["prompt_ids"]) == 3 * 5 * 4 // 4  # 24x40 px -> 6x10 patches -> 15
    assert s["messages"][0]["content"] == f"<image>{Q}"                # the record's own text is kept


def test_max_pixels_bounds_the_image_tokens(tmp_path, tok):
    f = _rows(tmp_path, [{"prompt": f"<image>{Q}", "images": ["img/0.png"]}])
    s = RLDataset([f], tok, DataConfig(max_prompt_length=64, image=ImageConfig(max_pixels=16 * 16)))[0]
    assert s["images"].image_grid_thw.tolist() == [[1, 4, 4]]          # resized to 16x16 px: 4 pads
    assert sum(t == VisionTokens.of(tok).pad for t in s["prompt_ids"]) == 4


def test_parquet_image_bytes_are_read(tmp_path, tok):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    tiny_images()[0].save(buf, format="PNG")
    pq.write_table(pa.Table.from_pylist([{"prompt": f"<image>{Q}", "images": [{"bytes": buf.getvalue(), "path": None}]},
                                         {"prompt": Q, "images": []}]), tmp_path / "t.parquet")
    ds = RLDataset([str(tmp_path / "t.parquet")], tok, DataConfig(max_prompt_length=64))
    assert ds[0]["images"].num_images == 1
    assert "images" not in ds[1]                                     # a text-only row has none


@pytest.mark.parametrize("row, match", [
    ({"prompt": f"<image>{Q}", "images": ["img/9.png"]}, r"t.jsonl:1: images\[0\]: image file not found"),
    ({"prompt": f"<image> <image> {Q}", "images": ["img/0.png"]}, r"t.jsonl:1: the prompt has 2 '<image>' "
                                                                     r"placeholders for 1 images"),
    ({"prompt": f"<image>{Q}", "images": ["img/0.png", "img/1.png", "img/0.png"]}, r"t.jsonl:1: .*3 images, more "
                                                                                    r"than data.image.max_images=2"),
    ({"prompt": f"<image>{Q}", "images": [b"not a png"]}, r"t.jsonl:1: images\[0\]"),
    ({"prompt": f"<image>{Q} " * 3, "images": ["img/0.png"] * 2 + ["img/1.png"]}, r"never truncated"),
])
def test_bad_image_rows_name_file_row_and_image(tmp_path, tok, row, match):
    if isinstance(row["images"][0], bytes):       # JSON cannot hold bytes: a dict with a bad path instead
        row = {**row, "images": [{"path": "img/none.png"}]}
    f = _rows(tmp_path, [row])
    cfg = DataConfig(max_prompt_length=40, truncation="left", image=ImageConfig(max_images=2 if "max_images" in match
                                                                               else 8))
    with pytest.raises(DataError, match=match):
        RLDataset([f], tok, cfg)[0]


def test_text_tokenizer_without_vision_tokens_is_refused(tmp_path, tokenizer):
    f = _rows(tmp_path, [{"prompt": f"<image>{Q}", "images": ["img/0.png"]}])
    with pytest.raises(ValueError, match=r"no special token '<\|vision_start\|>'"):
        RLDataset([f], tokenizer, DataConfig())


def test_images_ride_through_collate_select_and_micro_batches(tmp_path, tok):
    from megatron_rl.trainer.microbatch import make_microbatches

    f = _rows(tmp_path, [{"prompt": f"<image>{Q}", "images": ["img/0.png"]}, {"prompt": Q},
                         {"prompt": "describe the picture <image>", "images": ["img/1.png"]}])
    ds = RLDataset([f], tok, DataConfig(max_prompt_length=64))
    batch = collate_prompts([ds[i] for i in range(3)], tok.pad_token_id).repeat_interleave(2)
    assert [("images" in s) for s in batch.samples] == [True, True, False, False, True, True]
    r = 3
    batch["response_ids"] = torch.zeros(6, r, dtype=torch.long)
    batch["response_mask"] = torch.ones(6, r)
    mbs = make_microbatches(batch, 4)
    a, b = ds[0]["images"], ds[2]["images"]
    first, last = mbs[0]["images"], mbs[1]["images"]            # rows 0-3; rows 4, 5 + two filler copies of 4
    assert torch.equal(first.image_grid_thw, torch.cat([a.image_grid_thw] * 2))
    assert torch.equal(first.pixel_values, torch.cat([a.pixel_values] * 2))
    assert last.num_images == 4 and torch.equal(last.pixel_values, torch.cat([b.pixel_values] * 4))
    text_only = Batch.concat([batch.select([2, 3])])
    text_only["response_ids"], text_only["response_mask"] = torch.zeros(2, r, dtype=torch.long), torch.ones(2, r)
    assert "images" not in make_microbatches(text_only, 2)[0]
    assert ImageBatch.from_samples([None, None]) is None


def test_image_qa_tool_rows_load_and_the_reward_scores_the_first_answer(tmp_path, tok):
    from megatron_rl.rewards import get_reward
    from tools.make_image_qa_data import main

    main(["--out", str(tmp_path / "jsonl"), "--n-train", "4", "--n-val", "2", "--size", "32"])
    main(["--out", str(tmp_path / "pq"), "--n-train", "2", "--n-val", "1", "--format", "parquet"])
    for f in (tmp_path / "jsonl" / "train.jsonl", tmp_path / "pq" / "train.parquet"):
        s = RLDataset([str(f)], tok, DataConfig(max_prompt_length=128))[0]
        assert s["images"].num_images == 1 and s["data_source"] == "image_qa"
    reward = get_reward("image_qa")
    assert reward("There are 3 circles.", {"ground_truth": "3"}) == 1.0
    assert reward("three", {"ground_truth": "3"}) == 1.0
    assert reward("2 or 3", {"ground_truth": "3"}) == 0.0              # the first answer counts
    assert reward("The red bar.", {"ground_truth": "red"}) == 1.0
    assert reward("no idea", {"ground_truth": "red"}) == 0.0


def test_responses_end_before_a_sampled_vision_token(tok):
    from megatron_rl.data.multimodal import cut_at_vision_tokens, vision_token_ids

    ids = vision_token_ids(tok)
    pad = tok.pad_token_id
    b = Batch({"response_ids": torch.tensor([[30, ids[1], 31, 32], [30, 31, 32, pad], [ids[0], 30, 31, 32]]),
               "response_mask": torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]),
               "rollout_logprob": -torch.ones(3, 4)})
    assert cut_at_vision_tokens(b, ids, pad) == 2
    assert b["response_ids"].tolist() == [[30, pad, pad, pad], [30, 31, 32, pad], [pad] * 4]
    assert b["response_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert b["rollout_logprob"][0].tolist() == [-1, 0, 0, 0]


def test_a_renamed_image_column_still_lands_in_sample_images(tmp_path, tok):
    f = _rows(tmp_path, [{"prompt": f"<image>{Q}", "pictures": ["img/0.png"]}])
    s = RLDataset([f], tok, DataConfig(max_prompt_length=64, image=ImageConfig(key="pictures")))[0]
    assert isinstance(s["images"], ImageInputs) and "pictures" not in s
