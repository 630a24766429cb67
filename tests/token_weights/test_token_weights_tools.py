"""The doc-QA demo data and reward, and the VGR benchmark's CPU smoke mode."""
import json

from megatron_rl.token_weights.doc_qa import doc_qa_reward
from tools.make_doc_qa_data import main as make_data


def test_doc_qa_rows_state_the_answer_only_in_the_document(tmp_path):
    make_data(["--out", str(tmp_path), "--n-train", "20", "--n-val", "4"])
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    for r in rows:
        user = r["prompt"][-1]["content"]
        doc, question = user.split("</document>")
        assert doc.startswith("<document>") and r["ground_truth"] in doc and r["ground_truth"] not in question
        assert len(r["distractors"]) == 2 and all(d in doc for d in r["distractors"])


def test_doc_qa_reward_scores_answer_alone_over_a_list_of_candidates():
    s = {"ground_truth": "Rome", "distractors": ["Oslo", "Paris"]}
    assert doc_qa_reward("Ben lives in rome.", s) == 1.0
    assert doc_qa_reward("Rome or Oslo", s) == 0.5
    assert doc_qa_reward("Romeo", s) == 0.0


def test_bench_vgr_tiny_prints_table_and_writes_results(tmp_path, monkeypatch, capsys):
    from tools.bench_vgr import main

    monkeypatch.setenv("OUT", str(tmp_path))
    main(["--tiny"])
    text = (tmp_path / "vgr_results.md").read_text()
    assert "| logprob (baseline) |" in text and text.count("| vgr recompute | 2 |") == 2
    assert "| pass | last k |" in capsys.readouterr().out
