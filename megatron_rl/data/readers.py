"""Read records from JSONL and Parquet files, each tagged with its file and line.

Every record keeps where it came from (`Record.where`, e.g. `data/train.jsonl:17`)
so that any later error (missing key, over-long prompt) can name it, and so that
every sample gets a stable uid that survives reshuffles and restarts.
Parquet rows are numbered from 1 like lines.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator


class DataError(ValueError):
    """A bad record; the message starts with `file:line`."""


@dataclass
class Record:
    path: str
    line: int
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


READERS: dict[str, Callable[[Path], Iterator[Record]]] = {}


def register_reader(*suffixes: str):
    def decorator(fn):
        for s in suffixes:
            READERS[s] = fn
        return fn
    return decorator


@register_reader(".jsonl", ".json")
def read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield Record(str(path), lineno, obj)


@register_reader(".parquet")
def read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'megatron-rl[data]'") from None
    for row, obj in enumerate(pq.read_table(path).to_pylist(), 1):
        yield Record(str(path), row, obj)


def read_records(paths: list[str]) -> list[Record]:
    """All records of `paths`, in order; a missing file or unknown suffix is an error."""
    records: list[Record] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unknown data file type '{path.suffix}'; expected one of {sorted(READERS)}")
        records.extend(reader(path))
    return records
