"""Every Prometheus metric of the gateway, in one place, on a registry of its own (tests build one
per app). Base units, ``kvgate_`` prefix, bounded labels: tenant and model names come from the
policy, ``outcome`` from ``Outcome``; never request ids or keys."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.store_degraded = Gauge(
            "kvgate_store_degraded",
            "1 while the shared limit store is unreachable and the fallback decides.",
            registry=r,
        )

    def set_policy(self, fingerprint: str) -> None:
        self.policy_info.clear()
        self.policy_info.labels(fingerprint).set(1)
