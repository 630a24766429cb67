import importlib.util
import json
from pathlib import Path

from megatron_rl.data import DataConfig, RLDataset
from megatron_rl.rewards import get_reward

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_quickstart_data.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_quickstart_data", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_data_has_requested_sizes_and_correct_sums(tmp_path):
    load_tool().main(["--out", str(tmp_path), "--n-train", "150", "--n-val", "7", "--seed", "3"])
    train = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    val = [json.loads(l) for l in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (150, 7)
    for row in train + val:
        a, b = row["prompt"][-1]["content"].rstrip("?").split(" + ")
        assert row["ground_truth"] == str(int(a) + int(b)) and row["data_source"] == "quickstart"
    # the first 100 rows cover every single-digit pair once
    assert len({r["prompt"][-1]["content"] for r in train[:100]}) == 100


def test_quickstart_data_is_deterministic_per_seed(tmp_path):
    tool = load_tool()
    tool.main(["--out", str(tmp_path / "a"), "--n-train", "20", "--n-val", "4"])
    tool.main(["--out", str(tmp_path / "b"), "--n-train", "20", "--n-val", "4"])
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()


def test_quickstart_rows_load_and_score(tmp_path, tokenizer):
    load_tool().main(["--out", str(tmp_path), "--n-train", "4", "--n-val", "1"])
    sample = RLDataset([str(tmp_path / "train.jsonl")], tokenizer, DataConfig(max_prompt_length=64))[0]
    reward = get_reward("quickstart")
    assert reward(f"x = y\n#### {sample['ground_truth']}", sample) == 1.0
    assert reward("#### 99", sample) == 0.2
