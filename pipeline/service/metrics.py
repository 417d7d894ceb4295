"""The service's counters and histograms, rendered in Prometheus' text exposition format (no dependency).

Metric names (all prefixed ``anomalyclip_``): ``requests_total{path,code}``, ``errors_total{kind}``,
``request_latency_seconds`` (histogram, ``POST /predict``), ``batch_size`` (histogram, images per
forward pass), ``images_scored_total``, ``queue_depth`` (images waiting for the model, gauge).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """Cumulative buckets, count and sum (not thread-safe on its own: :class:`Metrics` holds the lock)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf only)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        running += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_count {running}", f"{name}_sum {self.total:.6f}"]
        return out


class Metrics:
    """Thread-safe counters of the service (updated from the event loop and the worker thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batches = Histogram(BATCH_BUCKETS)
        self.images_scored = 0

    def request(self, path: str, code: int) -> None:
        with self._lock:
            self.requests[(path, code)] += 1

    def predict_latency(self, seconds: float) -> None:
        with self._lock:
            self.latency.observe(seconds)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)
            self.images_scored += size

    def render(self, queue_depth: int) -> str:
        """The text exposition format (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP anomalyclip_requests_total HTTP requests answered, by path and status code.",
                     "# TYPE anomalyclip_requests_total counter"]
            lines += [f'anomalyclip_requests_total{{path="{path}",code="{code}"}} {count}'
                      for (path, code), count in sorted(self.requests.items())]
            lines += ["# HELP anomalyclip_errors_total Requests refused or failed, by kind.",
                      "# TYPE anomalyclip_errors_total counter"]
            lines += [f'anomalyclip_errors_total{{kind="{kind}"}} {count}'
                      for kind, count in sorted(self.errors.items())]
            lines += ["# HELP anomalyclip_request_latency_seconds Latency of POST /predict.",
                      "# TYPE anomalyclip_request_latency_seconds histogram",
                      *self.latency.lines("anomalyclip_request_latency_seconds"),
                      "# HELP anomalyclip_batch_size Images per forward pass.",
                      "# TYPE anomalyclip_batch_size histogram",
                      *self.batches.lines("anomalyclip_batch_size"),
                      "# HELP anomalyclip_images_scored_total Images through the model.",
                      "# TYPE anomalyclip_images_scored_total counter",
                      f"anomalyclip_images_scored_total {self.images_scored}",
                      "# HELP anomalyclip_queue_depth Images waiting for the model.",
                      "# TYPE anomalyclip_queue_depth gauge",
                      f"anomalyclip_queue_depth {queue_depth}"]
        return "\n".join(lines) + "\n"
