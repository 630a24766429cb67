"""Benchmark the BM25 retriever server: index build time, queries/s, recall of the answer passage.

    python tools/bench_retriever.py [--n-passages 100000] [--topk 3] [--backend bm25s] [--seconds 5]

Generates the search-QA corpus (tools/make_search_qa_data.py) with distractors, starts
ONE server process (`python -m megatron_rl.agent.retriever_server`) on a free loopback
port and drives it with the real client (`RetrieverClient`) from this process: batch
sizes 1..256 from one client thread, and 4 client threads at once. Prints tables.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_search_qa_data  # noqa: E402

from megatron_rl.agent.tools.search import RetrieverClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, limit_s: float = 600) -> dict:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"retriever server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"server at {base} not healthy after {limit_s}s")


def drive(client: RetrieverClient, queries: list[str], batch: int, seconds: float, threads: int = 1):
    """(queries/s, requests/s, median latency ms) for `threads` clients sending `batch` queries."""
    latencies, done, stop_at = [], [0], time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(offset: int):
        i = offset
        while time.perf_counter() < stop_at:
            qs = [queries[(i + j) % len(queries)] for j in range(batch)]
            t = time.perf_counter()
            client.retrieve(qs)
            with lock:
                latencies.append(time.perf_counter() - t)
                done[0] += 1
            i += batch
    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k * 997,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    return done[0] * batch / elapsed, done[0] / elapsed, 1000 * statistics.median(latencies)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-passages", type=int, default=100_000)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--backend", default="bm25s")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--batches", default="1,16,64,256")
    args = p.parse_args(argv)

    train, val, corpus = make_search_qa_data.build(2048, 0, args.n_passages, seed=1)
    questions = [r["prompt"][-1]["content"].removeprefix("Question: ") for r in train]
    answers = [r["ground_truth"][0] for r in train]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.jsonl")
        make_search_qa_data.write_jsonl(path, corpus)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.agent.retriever_server", "--corpus", path,
                                 "--port", str(port), "--topk", str(args.topk), "--backend", args.backend],
                                stderr=subprocess.DEVNULL)
        try:
            health = wait_healthy(base, proc)
            startup = time.perf_counter() - t0
            client = RetrieverClient(base + "/retrieve", topk=args.topk, timeout_s=120, retries=0)
            hits = client.retrieve(questions[:512])
            recall = sum(any(a in h["document"]["contents"] for h in hs) for hs, a in zip(hits, answers[:512]))
            print(f"corpus: {health['documents']} passages, backend {health['backend']}, top-k {args.topk}, "
                  f"{os.cpu_count()} CPU cores")
            print(f"index build: {health['index_build_s']:.2f} s   server start to healthy "
                  f"(python + import + JSONL load + build): {startup:.2f} s")
            print(f"answer passage in top-{args.topk}: {recall}/512 = {recall / 512:.1%}\n")
            print(f"| client threads | queries/request | queries/s | requests/s | median latency ms |")
            print(f"|---:|---:|---:|---:|---:|")
            rows = [(1, int(b)) for b in args.batches.split(",")] + [(4, 16)]
            for threads, batch in rows:
                qps, rps, lat = drive(client, questions, batch, args.seconds, threads)
                print(f"| {threads} | {batch} | {qps:,.0f} | {rps:,.1f} | {lat:.1f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
