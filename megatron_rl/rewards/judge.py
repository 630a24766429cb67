"""An LLM judge: a generative reward from an OpenAI-compatible `/v1/chat/completions`
endpoint (`vllm serve`, `megatron-rl serve`, a provider).

    judge = Judge(cfg.reward.judge)
    scores, metrics = judge.score(responses, samples)

Each row is one request: the Jinja template (`prompt_template`, a file; it sees `prompt`,
`response`, `sample`) renders the user message, the reply's text is parsed by `parse`
(`regex:<pattern>`: group 1, else the whole match; `json:<field>`: a field of the JSON
object in the reply, dotted for nesting). At most `max_concurrency` requests are in flight;
each attempt has `timeout_s` (connect and read), a failed attempt (connection refused,
timeout, HTTP error, unparsable reply) is retried `retries` times with exponential backoff,
and the whole call has a deadline, so a step never waits forever: a row still unanswered
then, or whose every attempt failed, gets `fallback`, is counted (`reward/judge_failures`,
by kind in `reward/judge_<kind>`) and logged with its uid and the last reply.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from megatron_rl.logging.values import MeanOver, Summed

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = ("Rate the response to the prompt from 0 to 10. Answer with the number only.\n\n"
                    "Prompt: {{ prompt }}\n\nResponse: {{ response }}\n\nScore:")
FAILURE_KINDS = ("timeout", "unreachable", "http_error", "parse_error")


class JudgeError(Exception):
    def __init__(self, kind: str, message: str, reply: str = ""):
        super().__init__(message)
        self.kind, self.reply = kind, reply


def parse_score(rule: str, text: str) -> float:
    """The score in a reply by `regex:<pattern>` or `json:<field>`; JudgeError(parse_error)."""
    kind, _, arg = rule.partition(":")
    if kind == "regex":
        m = re.search(arg, text)
        if m is None:
            raise JudgeError("parse_error", f"reply does not match {arg!r}", text)
        value = m.group(1) if m.groups() else m.group(0)
    elif kind == "json":
        start, end = text.find("{"), text.rfind("}")
        try:
            value = json.loads(text[start:end + 1]) if start >= 0 else None
            for key in arg.split("."):
                value = value[key]
        except (ValueError, KeyError, TypeError, IndexError):
            raise JudgeError("parse_error", f"reply has no JSON field {arg!r}", text) from None
    else:
        raise ValueError(f"reward.judge.parse must be regex:<pattern> or json:<field>, got {rule!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise JudgeError("parse_error", f"{value!r} is not a number", text) from None
    if score != score or score in (float("inf"), float("-inf")):
        raise JudgeError("parse_error", f"{value!r} is not a finite number", text)
    return score


class Judge:
    def __init__(self, cfg):
        import jinja2

        self.cfg = cfg
        source = Path(cfg.prompt_template).read_text() if cfg.prompt_template else DEFAULT_TEMPLATE
        self.template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(source)
        self.endpoint = cfg.url.rstrip("/") + ("" if cfg.url.rstrip("/").endswith("/v1") else "/v1") \
            + "/chat/completions"

    def render(self, response: str, sample: dict[str, Any]) -> str:
        prompt = sample.get("prompt_text")
        if prompt is None:
            prompt = "\n".join(m["content"] for m in sample.get("messages") or [])
        return self.template.render(prompt=prompt, response=response, sample=sample)

    def request(self, content: str) -> str:
        """One attempt: the reply text, or JudgeError naming the kind of failure."""
        c = self.cfg
        body = json.dumps({"model": c.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": c.max_tokens, "temperature": c.temperature}).encode()
        req = urllib.request.Request(self.endpoint, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=c.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise JudgeError("http_error", f"HTTP {e.code} from {self.endpoint}") from None
        except (socket.timeout, TimeoutError) as e:
            raise JudgeError("timeout", f"no reply from {self.endpoint} within {c.timeout_s}s ({e})") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            kind = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else "unreachable"
            raise JudgeError(kind, f"{self.endpoint}: {reason}") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError("parse_error", f"{self.endpoint} sent no chat completion",
                             raw[:200].decode(errors="replace")) from None

    def score_one(self, response: str, sample: dict[str, Any]) -> tuple[float | None, str, str, int]:
        """(score or None, failure kind, last reply, attempts)."""
        c = self.cfg
        content = self.render(response, sample)
        err = JudgeError("timeout", "not tried")
        for attempt in range(c.retries + 1):
            if attempt:
                time.sleep(c.backoff_s * 2 ** (attempt - 1))
            try:
                return parse_score(c.parse, self.request(content)), "", "", attempt + 1
            except JudgeError as e:
                err = e
        return None, err.kind, f"{err} (reply: {err.reply[:200]!r})", c.retries + 1

    def deadline_s(self) -> float:
        """The longest one row can take: every attempt timing out, plus the backoffs."""
        c = self.cfg
        return (c.retries + 1) * c.timeout_s * 2 + sum(c.backoff_s * 2 ** i for i in range(c.retries)) + 1.0

    def score(self, responses: Sequence[str], samples: Sequence[dict[str, Any]]) -> tuple[list[float], dict]:
        c = self.cfg
        n = len(responses)
        results: list[tuple[float | None, str, str, int]] = [(None, "timeout", "call deadline passed", 0)] * n
        pool = ThreadPoolExecutor(c.max_concurrency, thread_name_prefix="judge")
        futures = {pool.submit(self.score_one, r, s): i for i, (r, s) in enumerate(zip(responses, samples))}
        # Rows queue behind max_concurrency slots: the deadline grows with the number of waves.
        waves = -(-n // c.max_concurrency) if n else 0
        done, _ = wait(futures, timeout=self.deadline_s() * waves)
        for f in done:
            results[futures[f]] = f.result()
        pool.shutdown(wait=False, cancel_futures=True)     # stragglers end at their socket timeout
        scores, kinds = [], {k: 0 for k in FAILURE_KINDS}
        good = []
        for (score, kind, why, _), sample in zip(results, samples):
            if score is None:
                kinds[kind] += 1
                log.warning("judge on sample %s: %s; using reward.judge.fallback=%s", sample.get("uid", "?"),
                            why, c.fallback)
                score = c.fallback
            else:
                good.append(score)
            scores.append(score)
        metrics = {"reward/judge_failures": Summed(sum(kinds.values())),
                   "reward/judge_attempts": Summed(sum(r[3] for r in results)),
                   "reward/judge_parsed_mean": MeanOver.of(good)}
        metrics.update({f"reward/judge_{k}": Summed(v) for k, v in kinds.items()})
        return scores, metrics

    def empty_metrics(self) -> dict:
        """The judge's metric keys with no rows on this rank (every rank logs the same keys)."""
        return {"reward/judge_failures": Summed(0), "reward/judge_attempts": Summed(0),
                **{f"reward/judge_{k}": Summed(0) for k in FAILURE_KINDS}}
