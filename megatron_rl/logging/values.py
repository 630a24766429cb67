"""Metric values that say how they combine over data-parallel ranks.

A plain float metric is averaged over the DP ranks that hold it (max/min for keys ending
so). That is wrong for a statistic whose sample count differs by rank, e.g. the mean
reward of one data source that only some ranks drew. These float subclasses carry what
`reduce_metrics` (megatron_rl/parallel/data_parallel.py) needs to combine them exactly:

    MeanOver(mean, count)        -> sum(mean * count) / sum(count) over ranks
    StdOver(std, mean, count)    -> the std of all ranks' samples pooled (population std)
    Summed(value)                -> the sum over ranks (counts: failures, timeouts)

They are floats (the local value), so code that reads a metric before the reduction, the
sinks and `json` keep working. Pure python: rewards/ and others import it cheaply.
"""
from __future__ import annotations

import math
from typing import Iterable


class MeanOver(float):
    """The mean of `count` samples on this rank."""

    count: float

    def __new__(cls, mean: float, count: float):
        obj = super().__new__(cls, mean)
        obj.count = float(count)
        return obj

    @classmethod
    def of(cls, values: Iterable[float]) -> "MeanOver":
        vals = [float(v) for v in values]
        return cls(sum(vals) / len(vals) if vals else 0.0, len(vals))

    def __reduce__(self):
        return (type(self), (float(self), self.count))

    def __repr__(self) -> str:
        return f"MeanOver({float(self)!r}, count={self.count:g})"


class StdOver(float):
    """The population std of `count` samples on this rank whose mean is `mean`."""

    mean: float
    count: float

    def __new__(cls, std: float, mean: float, count: float):
        obj = super().__new__(cls, std)
        obj.mean, obj.count = float(mean), float(count)
        return obj

    @classmethod
    def of(cls, values: Iterable[float]) -> "StdOver":
        vals = [float(v) for v in values]
        n = len(vals)
        mean = sum(vals) / n if n else 0.0
        return cls(math.sqrt(sum((v - mean) ** 2 for v in vals) / n) if n else 0.0, mean, n)

    def __reduce__(self):
        return (type(self), (float(self), self.mean, self.count))

    def __repr__(self) -> str:
        return f"StdOver({float(self)!r}, mean={self.mean!r}, count={self.count:g})"


class Summed(float):
    """A total on this rank (a count of events); the global value is the sum over ranks."""

    def __reduce__(self):
        return (type(self), (float(self),))

    def __repr__(self) -> str:
        return f"Summed({float(self)!r})"
