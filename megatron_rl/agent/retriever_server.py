"""A lexical (BM25) retriever over a JSONL corpus, served over HTTP.

    python -m megatron_rl.agent.retriever_server --corpus corpus.jsonl [--port 8000] [--topk 3]

API (Search-R1's): `POST /retrieve {"queries": [...], "topk": k, "return_scores": bool}`
-> `{"result": [[{"document": {"id", "contents"}, "score"}, ...] per query]}`;
`GET /health` -> `{"status": "ok", "documents": N, ...}`. Bound to loopback by default:
the server has no authentication. Corpus lines hold `id` and `contents`, or `title`
and `text` (stored as `title\\ntext`, the first line becoming the title for clients).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np


def load_corpus(path: str) -> list[dict]:
    from megatron_rl.data.readers import read_jsonl

    docs = []
    for r in read_jsonl(path):
        rec = r.fields
        if "contents" in rec:
            contents = rec["contents"]
        elif "text" in rec:
            contents = f"{rec['title']}\n{rec['text']}" if rec.get("title") else rec["text"]
        else:
            raise ValueError(f"{path}:{r.line}: expected 'contents' or 'title'+'text', got keys {sorted(rec)}")
        docs.append({"id": str(rec.get("id", len(docs))), "contents": contents})
    if not docs:
        raise ValueError(f"{path}: corpus is empty")
    return docs


# Backends: build(list of texts) -> search(queries, k) -> (doc indices [Q, k], scores [Q, k]).
BACKENDS: dict[str, Callable] = {}


def register_backend(name: str):
    def deco(fn):
        BACKENDS[name] = fn
        return fn
    return deco


@register_backend("bm25s")
def _bm25s(texts: list[str]):
    """bm25s on numpy; with numba installed its compiled scorer (~15x more queries/s on
    a 100k corpus), compiled here by a warm-up query so no request pays the JIT."""
    import importlib.util

    import bm25s

    backend = "numba" if importlib.util.find_spec("numba") is not None else "numpy"
    retriever = bm25s.BM25(backend=backend)
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(queries: list[str], k: int):
        tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        docs, scores = retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1,
                                          backend_selection=backend)
        return docs, scores
    search(["warm up"], 1)
    search.name = "bm25s" if backend == "numpy" else "bm25s+numba"
    return search


@register_backend("rank_bm25")
def _rank_bm25(texts: list[str]):
    import re

    from rank_bm25 import BM25Okapi

    def tok(s):
        return re.findall(r"\w\w+", s.lower())

    bm25 = BM25Okapi([tok(t) for t in texts])

    def search(queries: list[str], k: int):
        scores = np.stack([bm25.get_scores(tok(q)) for q in queries])
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(scores, idx, 1)
    return search


class BM25Index:
    """The corpus plus a BM25 search function from the chosen backend."""

    def __init__(self, docs: list[dict], backend: str = "bm25s"):
        if backend not in BACKENDS:
            raise KeyError(f"unknown retriever backend '{backend}'; available: {sorted(BACKENDS)}")
        self.docs = docs
        t0 = time.perf_counter()
        self._search = BACKENDS[backend]([d["contents"] for d in docs])
        self.build_s = time.perf_counter() - t0
        self.backend = getattr(self._search, "name", backend)

    def search(self, queries: list[str], topk: int, return_scores: bool = True) -> list[list[dict]]:
        if not queries:
            return []
        k = max(1, min(topk, len(self.docs)))
        idx, scores = self._search(queries, k)
        out = []
        for row_idx, row_scores in zip(idx, scores):
            hits = []
            for i, s in zip(row_idx.tolist(), row_scores.tolist()):
                hit = {"document": dict(self.docs[i])}
                if return_scores:
                    hit["score"] = float(s)
                hits.append(hit)
            out.append(hits)
        return out


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one /retrieve request; past them the server answers 4xx and keeps serving."""
    max_body_bytes: int = 8 << 20
    max_queries: int = 4096
    max_query_chars: int = 4096
    max_topk: int = 100
    read_timeout_s: float = 30.0        # a client that stalls mid-request is dropped


class BadRequest(ValueError):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def parse_request(body: bytes, default_topk: int, limits: RequestLimits) -> tuple[list[str], int, bool]:
    """(queries, topk, return_scores) of a /retrieve body, or `BadRequest` naming the field."""
    req = json.loads(body or b"{}")
    if not isinstance(req, dict):
        raise BadRequest(400, "the body must be a JSON object with 'queries'")
    queries = req["queries"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest(400, "'queries' must be a list of strings")
    if len(queries) > limits.max_queries:
        raise BadRequest(413, f"{len(queries)} queries exceed the limit of {limits.max_queries}")
    longest = max((len(q) for q in queries), default=0)
    if longest > limits.max_query_chars:
        raise BadRequest(413, f"a query of {longest} characters exceeds the limit of {limits.max_query_chars}")
    topk = req.get("topk")
    topk = default_topk if topk is None or topk == 0 else topk      # 0 / absent: the server's default
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= limits.max_topk:
        raise BadRequest(400, f"'topk' must be an integer in [1, {limits.max_topk}], got {topk!r}")
    return queries, topk, bool(req.get("return_scores", False))


def make_server(index: BM25Index, host: str = "127.0.0.1", port: int = 8000,
                default_topk: int = 3, max_queries: int = 4096,
                limits: RequestLimits | None = None) -> ThreadingHTTPServer:
    """An HTTP server over `index` (not started: call `serve_forever()`; port 0 = any free)."""
    limits = limits or RequestLimits(max_queries=max_queries)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = limits.read_timeout_s

        def log_message(self, fmt, *args):   # one line per request is noise at RL rates
            pass

        def _reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "documents": len(index.docs), "backend": index.backend,
                                 "index_build_s": round(index.build_s, 3)})
            else:
                self._reply(404, {"error": f"no route GET {self.path}; use GET /health or POST /retrieve"})

        def _body(self) -> bytes:
            """The request body, its size checked before a byte is read."""
            try:
                n = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise BadRequest(411, "a Content-Length header (an integer) is required") from None
            if n < 0:
                raise BadRequest(400, f"Content-Length {n} is negative")
            if n > limits.max_body_bytes:
                raise BadRequest(413, f"a body of {n} bytes exceeds the limit of {limits.max_body_bytes}")
            return self.rfile.read(n)

        def do_POST(self):
            if self.path.rstrip("/") != "/retrieve":
                self._reply(404, {"error": f"no route POST {self.path}; use POST /retrieve"})
                return
            try:
                queries, topk, scores = parse_request(self._body(), default_topk, limits)
                result = index.search(queries, topk, scores)
            except BadRequest as e:
                self._reply(e.code, {"error": f"bad /retrieve request: {e}"})
                return
            except (ValueError, KeyError, TypeError) as e:
                self._reply(400, {"error": f"bad /retrieve request: {type(e).__name__}: {e}"})
                return
            except Exception as e:           # a search failure costs this request, not the server
                self._reply(500, {"error": f"retrieval failed: {type(e).__name__}: {e}"})
                return
            self._reply(200, {"result": result})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Start `server` on a daemon thread (tests, notebooks); stop with `server.shutdown()`."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's options on `p` (a CLI can mount them on its own subcommand parser)."""
    p.add_argument("--corpus", required=True, help="JSONL with id+contents or title+text per line")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; no auth!)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--topk", type=int, default=3, help="hits per query when a request gives none")
    p.add_argument("--backend", default="bm25s", choices=sorted(BACKENDS))
    return p


def serve(args: argparse.Namespace) -> int:
    """Load, index and serve until interrupted (args from `add_arguments`)."""
    docs = load_corpus(args.corpus)
    index = BM25Index(docs, args.backend)
    server = make_server(index, args.host, args.port, args.topk)
    host, port = server.server_address[:2]
    print(f"retriever: {len(docs)} documents indexed with {index.backend} in {index.build_s:.1f}s; "
          f"serving http://{host}:{port}/retrieve", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-rl serve-retriever", description=__doc__.split("\n")[0])
    return serve(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
