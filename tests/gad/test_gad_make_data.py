"""tools/make_gad_data.py: field mapping, validation split, skipped records."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("make_gad_data", Path(__file__).parents[2] / "tools" / "make_gad_data.py")
make_gad_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_gad_data)


def test_builds_train_and_val_from_custom_fields(tmp_path):
    src = tmp_path / "src.jsonl"
    with open(src, "w") as f:
        for i in range(10):
            f.write(json.dumps({"q": f"question {i}", "a": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": f"answer {i}"}]}) + "\n")
        f.write(json.dumps({"q": "no teacher"}) + "\n")
    assert make_gad_data.main(["--prompts", str(src), "--out", str(tmp_path / "out"), "--prompt-field", "q",
                               "--teacher-field", "a", "--val", "0.2"]) == 0
    train = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "out" / "val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (8, 2)
    rec = train[0]
    i = rec["prompt"].split()[-1]
    assert rec["teacher_response"] == f"answer {i}" and rec["source"].startswith("src.jsonl:")
