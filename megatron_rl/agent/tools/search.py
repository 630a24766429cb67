"""`search`: a client for the retriever server (`megatron_rl.agent.retriever_server`).

One POST per batch of queries. A dead or slow server must not kill a long RL run:
after `retries` retries with exponential backoff every query of the batch gets a
`ToolFailure` observation and `errors` is incremented; the next call tries again,
so a restarted server is picked up without any reconnect logic.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from megatron_rl.agent.tools.registry import ToolFailure, register_tool


def format_documents(results: list[dict]) -> str:
    """Search-R1's passage format: `Doc i(Title: <first line>) <rest>` per hit."""
    lines = []
    for i, hit in enumerate(results, 1):
        contents = hit["document"]["contents"]
        title, _, text = contents.partition("\n")
        lines.append(f"Doc {i}(Title: {title}) {text}" if text else f"Doc {i}: {title}")
    return "\n".join(lines) + "\n" if lines else "No results found.\n"


class RetrieverClient:
    def __init__(self, url: str = "http://127.0.0.1:8000/retrieve", topk: int = 3,
                 timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.5,
                 max_chars: int = 2000):
        self.url, self.topk, self.timeout_s = url, topk, timeout_s
        self.retries, self.backoff_s, self.max_chars = retries, backoff_s, max_chars
        self.errors = 0         # failed batch calls since construction
        self.calls = 0

    def retrieve(self, queries: list[str]) -> list[list[dict]]:
        """Raw hits per query; raises the last error once retries are spent."""
        body = json.dumps({"queries": queries, "topk": self.topk, "return_scores": True}).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    result = json.loads(resp.read())["result"]
                if len(result) != len(queries):
                    raise ValueError(f"{self.url} answered {len(result)} results for {len(queries)} queries")
                return result
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                last = e
        raise ConnectionError(f"retriever {self.url} failed after {self.retries + 1} attempts: {last}")

    def batch_call(self, queries: list[str]) -> list[str]:
        if not queries:
            return []
        self.calls += 1
        try:
            results = self.retrieve(queries)
        except ConnectionError as e:
            self.errors += 1
            return [ToolFailure(f"search error: {e}")] * len(queries)
        return [format_documents(hits)[: self.max_chars] for hits in results]


@register_tool("search")
def _search_from_config(config) -> RetrieverClient:
    return RetrieverClient(config.retriever_url, config.topk, config.timeout_s, config.retries,
                           config.backoff_s, config.max_tool_output_chars)
