"""Every Prometheus metric of the gateway, in one place, on a registry of its own (tests build one
per app). Base units, ``kvgate_`` prefix, bounded labels: tenant and model names come from the
policy, ``outcome`` from ``Outcome``; never request ids or keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvgate_requests",
            "Requests by how they ended.",
            ["tenant", "model", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "kvgate_request_duration_seconds",
            "Time from request to the last byte of the answer, admitted requests.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kvgate_upstream_first_byte_seconds",
            "Time from forwarding to the backend's response headers (time to first token).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "kvgate_queue_wait_seconds",
            "Time admitted requests waited for GPU memory.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "kvgate_tokens",
            "Tokens settled from real usage.",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self.kv_gib_seconds = Counter(
            "kvgate_kv_gib_seconds",
            "GPU KV-cache memory-time settled from real usage (GiB x seconds).",
            ["tenant", "model"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "kvgate_policy_reloads", "Policy reloads by result.", ["result"], registry=r
        )
        self.policy_info = Gauge(
            "kvgate_policy_info", "1 for the live policy.", ["fingerprint"], registry=r
        )
        self._children: dict[tuple[object, ...], Counter | Histogram] = {}
        self.store_degraded = Gauge(
            "kvgate_store_degraded",
            "1 while the shared limit store is unreachable and the fallback decides.",
            registry=r,
        )

    # The request path's metrics go through these: a label lookup costs microseconds, so each
    # labelled child is looked up once and kept (label sets are bounded by the policy).

    def count(self, tenant: str, model: str, outcome: str) -> None:
        _child(self.requests, self._children, tenant, model, outcome).inc()

    def settled(
        self, tenant: str, model: str, input_tokens: int, output_tokens: int, gib_s: float
    ) -> None:
        _child(self.tokens, self._children, tenant, model, "input").inc(input_tokens)
        _child(self.tokens, self._children, tenant, model, "output").inc(output_tokens)
        _child(self.kv_gib_seconds, self._children, tenant, model).inc(gib_s)

    def timed(self, histogram: Histogram, model: str, seconds: float) -> None:
        _child(histogram, self._children, model).observe(seconds)

    def watch_admission(self, snapshot: Callable[[], Mapping[str, object]]) -> None:
        """Export the admission state (read at scrape time, nothing on the request path)."""
        self.registry.register(_AdmissionCollector(snapshot))

    def set_policy(self, fingerprint: str) -> None:
        self.policy_info.clear()
        self.policy_info.labels(fingerprint).set(1)


def _child(
    metric: Counter | Histogram, cache: dict[tuple[object, ...], Counter | Histogram], *labels: str
) -> Any:
    key = (id(metric), *labels)
    child = cache.get(key)
    if child is None:
        child = cache[key] = metric.labels(*labels)
    return child


_BACKEND_GAUGES = (
    ("usable", "kvgate_backend_kv_usable_bytes", "KV bytes (or slots) admission may plan now."),
    (
        "reserved_bytes",
        "kvgate_backend_kv_reserved_bytes",
        "KV bytes reserved by requests in flight.",
    ),
    ("inflight", "kvgate_backend_inflight_requests", "Requests in flight through this gateway."),
    ("fragmentation", "kvgate_backend_fragmentation_ratio", "1 - largest free block / free."),
)


class _AdmissionCollector(Collector):
    def __init__(self, snapshot: Callable[[], Mapping[str, object]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        phase = GaugeMetricFamily(
            "kvgate_backend_phase",
            "1 for the backend's current phase (loading, warming, ready, ejected).",
            labels=["model", "backend", "phase"],
        )
        gauges = {
            key: GaugeMetricFamily(name, text, labels=["model", "backend"])
            for key, name, text in _BACKEND_GAUGES
        }
        depth = GaugeMetricFamily("kvgate_queue_depth", "Requests waiting.", labels=["model"])
        oldest = GaugeMetricFamily(
            "kvgate_queue_oldest_wait_seconds", "Age of the oldest waiter.", labels=["model"]
        )
        for model, raw in self._snapshot().items():
            pool = raw if isinstance(raw, dict) else {}
            depth.add_metric([model], float(pool.get("queue_depth", 0)))
            oldest.add_metric([model], float(pool.get("oldest_wait_s", 0.0)))
            for backend in pool.get("backends", []):
                url = str(backend["url"])
                phase.add_metric([model, url, str(backend["phase"])], 1.0)
                for key, gauge in gauges.items():
                    gauge.add_metric([model, url], float(backend.get(key) or 0.0))
        yield phase
        yield from gauges.values()
        yield depth
        yield oldest
