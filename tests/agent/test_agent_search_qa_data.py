"""tools/make_search_qa_data.py: questions answerable only from the generated corpus."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "make_search_qa_data", Path(__file__).resolve().parents[2] / "tools" / "make_search_qa_data.py")
make_data = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(make_data)


def test_each_question_has_exactly_one_answering_passage_about_its_entity():
    train, val, corpus = make_data.build(40, 10, n_passages=500, seed=3)
    assert (len(train), len(val), len(corpus)) == (40, 10, 500)
    for rec in train + val:
        question = rec["prompt"][-1]["content"]
        answer = rec["ground_truth"][0]
        entity_docs = [d for d in corpus if d["contents"].split("\n")[0] in question]
        assert len(entity_docs) == 2                                  # the fact and a near miss
        assert sum(answer in d["contents"] for d in entity_docs) == 1


def test_cli_writes_chat_prompts_with_the_tag_instruction(tmp_path):
    assert make_data.main(["--out", str(tmp_path), "--n-train", "4", "--n-val", "2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["data_source"] == "search_qa"
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert "<search> query </search>" in rows[0]["prompt"][0]["content"]
    assert len((tmp_path / "corpus.jsonl").read_text().splitlines()) == 12


def test_same_seed_same_data():
    assert make_data.build(5, 1, 50, seed=7) == make_data.build(5, 1, 50, seed=7)


def test_few_shot_turns_show_the_protocol_as_the_loop_injects_it():
    from megatron_rl.agent.actions import OBS_CLOSE, OBS_OPEN

    train, _, corpus = make_data.build(6, 2, seed=1, few_shot=2)
    prompt = train[0]["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
    first = prompt[2]["content"]
    assert first == ("<search> capital of Belmora </search>" + OBS_OPEN
                     + "Doc 1(Title: Belmora) Belmora is a small inland country. Belmora's capital is Tessin.\n"
                     + "Doc 2(Title: Belmora) Belmora is known for its salt exports and its mountain festivals.\n"
                     + OBS_CLOSE + "<answer> Tessin </answer>")
    assert not any(w in d["contents"] for d in corpus for w in ("Belmora", "Garvik", "Ostwin"))
    assert make_data.build(6, 2, seed=1) != make_data.build(6, 2, seed=1, few_shot=2)
