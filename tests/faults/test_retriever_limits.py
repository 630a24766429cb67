"""The retriever server bounds every request (body size, number and length of queries,
topk) and answers oversized or malformed ones with 4xx without dying."""
import json
import socket

import pytest

from megatron_rl.agent.retriever_server import BM25Index, RequestLimits, make_server, serve_in_thread

DOCS = [{"id": f"d{i}", "contents": f"document {i} about topic {i % 3}"} for i in range(10)]


@pytest.fixture(scope="module")
def server():
    srv = make_server(BM25Index(DOCS, "bm25s"), port=0, limits=RequestLimits(
        max_body_bytes=4096, max_queries=8, max_query_chars=64, max_topk=5, read_timeout_s=2.0))
    serve_in_thread(srv)
    yield srv.server_address[:2]
    srv.shutdown()
    srv.server_close()


def raw(addr, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes, return (status, JSON body)."""
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def post(addr, payload, raw_body: bytes | None = None, length: int | None = None):
    body = raw_body if raw_body is not None else json.dumps(payload).encode()
    n = len(body) if length is None else length
    return raw(addr, f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n".encode(), body)


@pytest.mark.parametrize("payload, code, says", [
    ({"queries": ["q"] * 9}, 413, "9 queries exceed the limit of 8"),
    ({"queries": ["x" * 65]}, 413, "65 characters exceeds the limit of 64"),
    ({"queries": ["topic"], "topk": 6}, 400, "'topk' must be an integer in [1, 5]"),
    ({"queries": ["topic"], "topk": "3"}, 400, "'topk' must be an integer"),
    ({"queries": ["topic"], "topk": -1}, 400, "'topk'"),
    ({"queries": [1, 2]}, 400, "'queries' must be a list of strings"),
    ({"no_queries": []}, 400, "KeyError"),
    ([1, 2, 3], 400, "JSON object"),
])
def test_bad_requests_get_4xx_naming_the_field(server, payload, code, says):
    status, body = post(server, payload)
    assert status == code and says in body["error"], body


def test_oversized_malformed_and_headerless_requests(server):
    status, body = post(server, None, raw_body=b"", length=10 ** 9)       # refused before reading a byte
    assert status == 413 and "exceeds the limit of 4096" in body["error"]
    assert post(server, None, raw_body=b"{not json")[0] == 400
    assert post(server, None, raw_body=b"\xff\xfe\x00")[0] == 400
    status, body = raw(server, b"POST /retrieve HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411 and "Content-Length" in body["error"]
    assert raw(server, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404


def test_server_keeps_serving_after_bad_and_stalled_clients(server):
    with socket.create_connection(server, timeout=5) as stalled:           # promises a body, never sends it
        stalled.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        for _ in range(3):
            post(server, None, raw_body=b"garbage")
        status, body = post(server, {"queries": ["topic 1"], "topk": 2})
    assert status == 200 and len(body["result"][0]) == 2
