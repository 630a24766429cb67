"""The BM25 retriever server: API shape, ranking, errors, and the module entry point."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from megatron_rl.agent.retriever_server import BM25Index, load_corpus


def post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_retrieve_ranks_the_passage_with_the_answer_first(retriever):
    res = post(retriever.url, {"queries": ["capital of Zorvania", "Brevik architect"], "topk": 3,
                               "return_scores": True})["result"]
    assert [len(r) for r in res] == [3, 3]
    assert res[0][0]["document"] == {"id": "zorvania", "contents": "Zorvania\nZorvania's capital is Kelmar."}
    assert res[1][0]["document"]["id"] == "brevik"
    assert res[0][0]["score"] > res[0][1]["score"] >= res[0][2]["score"]


def test_scores_are_left_out_unless_asked_and_topk_defaults_to_server_value(retriever):
    (hits,) = post(retriever.url, {"queries": ["Quillon"]})["result"]
    assert len(hits) == 3 and "score" not in hits[0] and hits[0]["document"]["id"] == "quillon"


def test_health_and_bad_requests(retriever):
    base = retriever.url.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + "/health", timeout=5) as resp:
        health = json.loads(resp.read())
    assert (health["status"], health["documents"]) == ("ok", 5) and health["backend"].startswith("bm25s")
    with pytest.raises(urllib.error.HTTPError) as e:
        post(retriever.url, {"queries": "not a list"})
    assert e.value.code == 400 and "'queries' must be a list" in json.loads(e.value.read())["error"]


def test_rank_bm25_backend_agrees_on_the_top_hit(corpus_path):
    for backend in ("bm25s", "rank_bm25"):
        index = BM25Index(load_corpus(corpus_path), backend)
        assert index.search(["capital of Zorvania"], 2)[0][0]["document"]["id"] == "zorvania"


def test_corpus_lines_need_contents_or_text(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "contents": "ok"}\n{"id": 2, "body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected 'contents' or 'title'\+'text'"):
        load_corpus(str(path))


def test_module_entry_point_serves_on_loopback(corpus_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.agent.retriever_server", "--corpus", corpus_path,
                             "--port", str(port), "--topk", "1"], stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/retrieve"
        for _ in range(1200):          # up to a minute (numba, if installed, compiles first)
            try:
                res = post(url, {"queries": ["Kelmar"]})
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        else:
            raise AssertionError(f"server did not come up: {proc.stderr.read1().decode()}")
        assert [[h["document"]["id"] for h in r] for r in res["result"]] == [["zorvania"]]
    finally:
        proc.terminate()
        proc.wait(10)


def test_server_module_does_not_import_torch():
    code = "import sys, megatron_rl.agent.retriever_server; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
