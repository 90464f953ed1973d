"""A small Prometheus text-format registry: counters, gauges and histograms with labels.

The node agent (:mod:`node_agent.metrics`) and the controller (:mod:`controller.metrics`) each declare
their metrics with it and serve ``registry.render()`` at ``GET /metrics``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import TypeVar

LabelKey = tuple[tuple[str, str], ...]
M = TypeVar("M", bound="Metric")


def _key(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


def _fmt_labels(key: LabelKey, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(key) + list(extra)
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError

    def drop(self, label: str, value: str) -> None:
        """Forget every series whose ``label`` is ``value`` (what it counted is gone: a function version)."""
        raise NotImplementedError


class _Values(Metric):
    """One value per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.values: dict[LabelKey, float] = {}

    def replace(self, values: dict[LabelKey, float]) -> None:
        """All the series at once (for values kept elsewhere and read when the page is rendered)."""
        self.values = values

    def render(self) -> list[str]:
        return [f"{self.name}{_fmt_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]

    def drop(self, label: str, value: str) -> None:
        self.values = {k: v for k, v in self.values.items() if (label, value) not in k}


class Counter(_Values):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(_key(labels), 0.0)


class Gauge(_Values):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[_key(labels)] = value


DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelKey, list[float]] = {}  # bucket counts..., +Inf count, sum

    def observe(self, value: float, **labels: str) -> None:
        key = _key(labels)
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.buckets) + 2)
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def drop(self, label: str, value: str) -> None:
        self.series = {k: row for k, row in self.series.items() if (label, value) not in k}

    def count(self, **labels: str) -> int:
        row = self.series.get(_key(labels))
        return int(sum(row[:-1])) if row else 0

    def render(self) -> list[str]:
        lines: list[str] = []
        for key, row in sorted(self.series.items()):
            cumulative = 0.0
            for bound, n in zip(self.buckets, row, strict=False):
                cumulative += n
                lines.append(f"{self.name}_bucket{_fmt_labels(key, [('le', _num(bound))])} {_num(cumulative)}")
            cumulative += row[len(self.buckets)]
            lines.append(f"{self.name}_bucket{_fmt_labels(key, [('le', '+Inf')])} {_num(cumulative)}")
            lines.append(f"{self.name}_sum{_fmt_labels(key)} {_num(row[-1])}")
            lines.append(f"{self.name}_count{_fmt_labels(key)} {_num(cumulative)}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def drop(self, label: str, value: str) -> None:
        for metric in self.metrics:
            metric.drop(label, value)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.header()
            lines += metric.render()
        return "\n".join(lines) + "\n"
