"""pdorch's own figures for a window of time, from two scrapes of its Prometheus ``/metrics``.

Counters and histograms only grow, so what a run did is the difference between a scrape after it
and one before: a histogram's mean is exact (the change of ``_sum`` over the change of ``_count``),
its quantiles are interpolated within the change of its buckets (so only as fine as the buckets).
"""

from __future__ import annotations

import itertools
import math
import re
import urllib.request
from dataclasses import dataclass

_LE = re.compile(r'le="([^"]+)"')


def parse(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, by its series (name and labels as written)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            continue  # a line that is not a sample: not ours to judge
    return out


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as r:
        return parse(r.read().decode())


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metric's series (all of them, or those with the given label values)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        value
        for series, value in samples.items()
        if (series == name or series.startswith(name + "{")) and all(w in series for w in wanted)
    )


@dataclass(frozen=True)
class Histogram:
    """A histogram's change over a window: cumulative bucket counts by upper bound, sum, count."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """As Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
        low, high, rank, below, count = self._find(q)
        if math.isnan(high) or math.isinf(high):
            return low  # past the last finite bound: all that can be said is "above it"
        return low + (high - low) * (rank - below) / max(count - below, 1e-12)

    def bucket(self, q: float) -> tuple[float, float]:
        """The bucket (low, high] the q-quantile is in: all that the histogram really knows."""
        low, high, *_ = self._find(q)
        return low, high

    def _find(self, q: float) -> tuple[float, float, float, float, float]:
        """(low, high, rank, count below low, count up to high) of the bucket holding rank q."""
        if not self.count or not self.buckets:
            return math.nan, math.nan, math.nan, math.nan, math.nan
        rank, low, below = q * self.count, 0.0, 0.0
        for bound, count in self.buckets:
            if count >= rank:
                return low, bound, rank, below, count
            low, below = bound, count
        return low, math.inf, rank, below, below


def histogram(samples: dict[str, float], name: str) -> Histogram:
    buckets = []
    for series, count in samples.items():
        if series.startswith(name + "_bucket{") and (le := _LE.search(series)):
            buckets.append((float(le.group(1)), count))
    return Histogram(tuple(sorted(buckets)), total(samples, name + "_sum"), total(samples, name + "_count"))


def histogram_delta(before: dict[str, float], after: dict[str, float], name: str) -> Histogram:
    """What was observed between two scrapes (a histogram absent before counts as empty)."""
    b, a = histogram(before, name), histogram(after, name)
    earlier = dict(b.buckets)
    buckets = tuple((bound, count - earlier.get(bound, 0.0)) for bound, count in a.buckets)
    return Histogram(buckets, a.sum - b.sum, a.count - b.count)


def active_span(points: list[tuple[float, float]]) -> float:
    """Seconds from the first change of a counter polled at (time, value) points to its last one.

    A change happened somewhere between the poll before it and the one that saw it: each end is
    placed halfway, so the span is right to within one polling interval.
    """
    changes = [(t0 + t1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(points) if v1 != v0]
    return changes[-1] - changes[0] if len(changes) > 1 else math.nan
