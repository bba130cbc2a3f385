"""Serving metrics: counters and latency histograms kept by the engine, as a dict or for Prometheus.

The engine thread records; `snapshot` may be called from any thread (plain reads of ints and lists).
Prometheus export needs the optional `prometheus-client` package (`pip install decoding[serve]`): a
collector reads the same figures at scrape time, so serving pays nothing per token for it.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections import deque

# Seconds. TTFT includes queueing and the prefill; inter-token latency is one step of a running request.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW_S = 10.0


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket i counts values <= buckets[i])."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Estimate by linear interpolation inside the bucket (as Prometheus' histogram_quantile)."""
        if not self.count:
            return 0.0
        rank, seen = q * self.count, 0
        for i, c in enumerate(self.counts):
            if seen + c >= rank and c:
                lo = self.buckets[i - 1] if i else 0.0
                if i == len(self.buckets):
                    return lo  # in +Inf: the largest finite bound is the best we know
                return lo + (self.buckets[i] - lo) * (rank - seen) / c
            seen += c
        return self.buckets[-1]

    def snapshot(self) -> dict:
        cumulative, total = {}, 0
        for bound, c in zip((*self.buckets, float("inf")), self.counts):
            total += c
            cumulative[bound] = total
        return {"count": self.count, "sum": self.sum, "buckets": cumulative,
                "p50": self.quantile(0.5), "p90": self.quantile(0.9), "p99": self.quantile(0.99)}


class Metrics:
    """What the engine counts (see Generator.metrics for the dict it gives)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.requests_submitted = 0
        self.requests_finished = 0
        self.requests_cancelled = 0
        self.requests_failed = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated in that step)

    def record_step(self, now: float, tokens: int) -> None:
        self.steps += 1
        self.generation_tokens += tokens
        self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self, now: float) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds (or since the start)."""
        total = sum(n for t, n in list(self._recent) if t >= now - RATE_WINDOW_S)
        return total / max(min(RATE_WINDOW_S, now - self.started), 1e-3)


def register_prometheus(engine, registry=None, prefix: str = "decoding") -> object:
    """Expose an engine's metrics on a prometheus_client registry (default: the global REGISTRY).

    Returns the collector (unregister it with `registry.unregister(collector)`). Raises ImportError with
    the install hint when prometheus-client is missing.
    """
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    except ImportError as e:
        raise ImportError("Prometheus metrics need prometheus-client: pip install 'decoding[serve]'") from e

    ref = weakref.ref(engine)

    class Collector:
        def collect(self):
            eng = ref()
            if eng is None:
                return
            snap = eng.metrics_snapshot()
            for name, doc in (("requests_running", "Sequences in the running batch"),
                              ("requests_waiting", "Sequences waiting to be admitted (new or preempted)"),
                              ("kv_blocks_used", "KV cache blocks held by sequences"),
                              ("kv_blocks_free", "KV cache blocks free (cached prefixes included)"),
                              ("kv_blocks_cached", "KV cache blocks holding a reusable prefix"),
                              ("tokens_per_second", "Generated tokens per second, last 10 s"),
                              ("prefix_cache_hit_rate", "Share of admitted tokens found in the prefix cache")):
                yield GaugeMetricFamily(f"{prefix}_{name}", doc, value=snap[name])
            for name, doc in (("requests_finished", "Requests finished"),
                              ("requests_cancelled", "Requests cancelled"),
                              ("requests_failed", "Requests that failed (engine error)"),
                              ("prompt_tokens", "Prompt tokens submitted"),
                              ("generation_tokens", "Tokens generated"),
                              ("preemptions", "Sequences preempted for lack of KV blocks"),
                              ("steps", "Model steps run")):
                yield CounterMetricFamily(f"{prefix}_{name}", doc, value=snap[f"{name}_total"])
            for name, doc in (("time_to_first_token_seconds", "Submission to first token"),
                              ("inter_token_latency_seconds", "Time between two tokens of a request")):
                h = snap[name.removesuffix("_seconds")]
                buckets = [(str(b) if b != float("inf") else "+Inf", c) for b, c in h["buckets"].items()]
                yield HistogramMetricFamily(f"{prefix}_{name}", doc, buckets=buckets, sum_value=h["sum"])

    collector = Collector()
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
