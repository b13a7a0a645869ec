"""Every Prometheus metric of the gateway, in one place, on a registry of its own (tests build one
per app). Base units, ``kvgate_`` prefix, bounded labels: tenant and model names come from the
policy, ``outcome`` from ``Outcome``, ``status`` is the HTTP status the client got; never request
ids or keys."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import __version__

_GIB = 2**30
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# The request path's series are plain Python numbers, exported by ``_RequestCollector`` at scrape
# time: prometheus_client's children take a lock and loop over every bucket on each update, several
# microseconds per request. No locks here: the gateway is one asyncio thread, and both the request
# path and the /metrics handler run on its loop, so a scrape never sees an update half done.


class RequestHistogram:
    """A histogram by model: a count per bucket and a sum, made cumulative only when scraped."""

    __slots__ = ("bounds", "children", "documentation", "le", "name")

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = buckets
        # the +Inf bucket is the slot past the last bound, where bisect puts anything larger; the
        # others are spelt as prometheus_client spells them (untyped there)
        self.le = [*(floatToGoString(b) for b in buckets), "+Inf"]  # type: ignore[no-untyped-call]
        self.children: dict[str, _Buckets] = {}

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model, child in self.children.items():
            cumulative = 0
            buckets = []
            for le, count in zip(self.le, child.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric([model], buckets, child.sum)
        return family


class _Buckets:
    __slots__ = ("counts", "sum")

    def __init__(self, bounds: int) -> None:
        self.counts = [0] * (bounds + 1)
        self.sum = 0.0


class _Settled:
    """What one (tenant, model) settled: the two ``kind``s of tokens and the GiB·s."""

    __slots__ = ("gib_s", "input_tokens", "output_tokens")

    def __init__(self) -> None:
        self.input_tokens = 0.0
        self.output_tokens = 0.0
        self.gib_s = 0.0


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._requests: defaultdict[tuple[str, str, str, str], float] = defaultdict(float)
        self._settled: defaultdict[tuple[str, str], _Settled] = defaultdict(_Settled)
        self._shared_degraded: Gauge | None = None
        self._shared_switches: Counter | None = None
        self.duration = RequestHistogram(
            "kvgate_request_duration_seconds",
            "Time from request to the last byte of the answer, admitted requests.",
            _LATENCY_BUCKETS,
        )
        self.ttft = RequestHistogram(
            "kvgate_upstream_first_byte_seconds",
            "Time from forwarding to the first token: a stream's first event, else the headers.",
            _LATENCY_BUCKETS,
        )
        self.queue_wait = RequestHistogram(
            "kvgate_queue_wait_seconds",
            "Time admitted requests waited for GPU memory.",
            _LATENCY_BUCKETS,
        )
        r.register(
            _RequestCollector(
                self._requests, self._settled, (self.duration, self.ttft, self.queue_wait)
            )
        )
        self.policy_reloads = Counter(
            "kvgate_policy_reloads", "Policy reloads by result.", ["result"], registry=r
        )
        self.uncosted = Counter(
            "kvgate_uncosted_requests",
            "Requests on paths without cost rules let through by server.unknown_endpoints.",
            ["tenant", "model", "rule"],
            registry=r,
        )
        self.connections_refused = Counter(
            "kvgate_connections_refused",
            "Client connections answered 503 and closed at a cap (per_client, global).",
            ["reason"],
            registry=r,
        )
        self.connections_timed_out = Counter(
            "kvgate_connections_timed_out",
            "Client connections closed at a phase deadline (first_request, headers, idle).",
            ["phase"],
            registry=r,
        )
        self.internal_errors = Counter(
            "kvgate_internal_errors",
            "Requests that met an unexpected exception, answered 500 (logged, rate-limited).",
            registry=r,
        )
        self.asyncio_tasks = Gauge(
            "kvgate_asyncio_tasks", "Tasks on the event loop at the last scrape.", registry=r
        )
        self.policy_info = Gauge(
            "kvgate_policy_info", "1 for the live policy.", ["fingerprint"], registry=r
        )
        self.policy_loaded = Gauge(
            "kvgate_policy_last_reload_success_timestamp_seconds",
            "Unix time the live policy was loaded (at start or by the last successful reload).",
            registry=r,
        )
        build = Gauge("kvgate_build_info", "1, labelled with the version.", ["version"], registry=r)
        build.labels(__version__).set(1)
        self.store_degraded = Gauge(
            "kvgate_store_degraded",
            "1 while the shared limit store is unreachable and the fallback decides.",
            registry=r,
        )

    def count(self, tenant: str, model: str, outcome: str, status: int) -> None:
        """One request that ended with ``outcome``; the client got HTTP ``status``."""
        self._requests[tenant, model, outcome, str(status)] += 1.0

    def settled(
        self, tenant: str, model: str, input_tokens: int, output_tokens: int, gib_s: float
    ) -> None:
        settled = self._settled[tenant, model]
        settled.input_tokens += input_tokens
        settled.output_tokens += output_tokens
        settled.gib_s += gib_s

    def timed(self, histogram: RequestHistogram, model: str, seconds: float) -> None:
        try:
            child = histogram.children[model]
        except KeyError:
            child = histogram.children[model] = _Buckets(len(histogram.bounds))
        # bisect_left finds the first bound >= seconds: ``le`` is inclusive
        child.counts[bisect_left(histogram.bounds, seconds)] += 1
        child.sum += seconds

    def watch_admission(self, snapshot: Callable[[], Mapping[str, object]]) -> None:
        """Export the admission state (read at scrape time, nothing on the request path)."""
        self.registry.register(_AdmissionCollector(snapshot))

    def shared_admission_switched(self, degraded: bool) -> None:
        """Shared admission lost Redis (``degraded``) or reached it again. Its series exist only
        where ``admission.shared`` is on."""
        if self._shared_degraded is None or self._shared_switches is None:
            self._shared_degraded = Gauge(
                "kvgate_shared_admission_degraded",
                "1 while shared admission cannot reach Redis and plans 1/replicas of each backend.",
                registry=self.registry,
            )
            self._shared_switches = Counter(
                "kvgate_shared_admission_switches",
                "Switches of shared admission to (degraded) and from (shared) its fallback.",
                ["to"],
                registry=self.registry,
            )
        self._shared_degraded.set(1 if degraded else 0)
        self._shared_switches.labels("degraded" if degraded else "shared").inc()

    def set_policy(self, fingerprint: str) -> None:
        """``fingerprint`` is live, loaded now."""
        self.policy_info.clear()
        self.policy_info.labels(fingerprint).set(1)
        self.policy_loaded.set_to_current_time()


class _RequestCollector(Collector):
    """The request path's series, exported as prometheus_client's Counter and Histogram would be
    but without ``_created`` samples: the text format carries them as one more gauge series per
    child, which Prometheus does not read as creation times."""

    def __init__(
        self,
        requests: Mapping[tuple[str, str, str, str], float],
        settled: Mapping[tuple[str, str], _Settled],
        histograms: tuple[RequestHistogram, ...],
    ) -> None:
        self._requests = requests
        self._settled = settled
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "kvgate_requests",
            "Requests by how they ended and the HTTP status the client got.",
            labels=["tenant", "model", "outcome", "status"],
        )
        for labels, value in self._requests.items():
            requests.add_metric(labels, value)
        yield requests
        for histogram in self._histograms:
            yield histogram.family()
        tokens = CounterMetricFamily(
            "kvgate_tokens", "Tokens settled from real usage.", labels=["tenant", "model", "kind"]
        )
        byte_s = CounterMetricFamily(
            "kvgate_kv_byte_seconds",
            "GPU KV-cache memory-time settled from real usage (bytes x seconds).",
            labels=["tenant", "model"],
        )
        for (tenant, model), settled in self._settled.items():
            tokens.add_metric([tenant, model, "input"], settled.input_tokens)
            tokens.add_metric([tenant, model, "output"], settled.output_tokens)
            byte_s.add_metric([tenant, model], settled.gib_s * _GIB)
        yield tokens
        yield byte_s

    def describe(self) -> Iterator[Metric]:
        """The family names, so the registry refuses a second ``Metrics`` (a name clash) on it."""
        return self.collect()


_BACKEND_GAUGES = (
    (
        "reserved_bytes",
        "kvgate_backend_kv_reserved_bytes",
        "KV bytes reserved by requests in flight.",
    ),
    ("inflight", "kvgate_backend_inflight_requests", "Requests in flight through this gateway."),
    ("fragmentation", "kvgate_backend_fragmentation_ratio", "1 - largest free block / free."),
)
# What admission plans with, by the backend's capacity kind: bytes of KV cache, or llama.cpp's
# slots (one request each). A concurrency-limited backend (no memory signal) has neither.
_USABLE = {
    "bytes": ("kvgate_backend_kv_usable_bytes", "KV bytes admission may plan now."),
    "slots": ("kvgate_backend_slots_usable", "Slots (one request each) admission may plan now."),
}
# The demand signals an autoscaler scales on, per model.
_MODEL_GAUGES = (
    ("kvgate_queue_kv_bytes", "KV bytes the queued requests will reserve."),
    (
        "kvgate_queue_drain_bytes_per_second",
        "KV bytes released per second by finished requests (measured over the last seconds).",
    ),
    (
        "kvgate_queue_predicted_wait_seconds",
        "Predicted wait before a request of the last priority band arriving now starts.",
    ),
    (
        "kvgate_model_kv_wanted_bytes",
        "KV bytes wanted: reserved by requests in flight plus what the queue will reserve.",
    ),
    ("kvgate_model_kv_usable_bytes", "KV bytes admission may plan on the model's backends."),
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
        usable = {
            kind: GaugeMetricFamily(name, text, labels=["model", "backend"])
            for kind, (name, text) in _USABLE.items()
        }
        depth = GaugeMetricFamily("kvgate_queue_depth", "Requests waiting.", labels=["model"])
        oldest = GaugeMetricFamily(
            "kvgate_queue_oldest_wait_seconds", "Age of the oldest waiter.", labels=["model"]
        )
        demand = [GaugeMetricFamily(name, text, labels=["model"]) for name, text in _MODEL_GAUGES]
        queued, drain, wait, wanted, usable_bytes = demand
        for model, raw in self._snapshot().items():
            pool = raw if isinstance(raw, dict) else {}
            depth.add_metric([model], float(pool.get("queue_depth", 0)))
            oldest.add_metric([model], float(pool.get("oldest_wait_s", 0.0)))
            queued_bytes = float(pool.get("queued_bytes", 0.0))
            queued.add_metric([model], queued_bytes)
            drain.add_metric([model], float(pool.get("drain_bytes_per_s") or 0.0))
            if pool.get("predicted_wait_s") is not None:
                wait.add_metric([model], float(pool["predicted_wait_s"]))
            reserved = planned = 0.0
            for backend in pool.get("backends", []):
                url = str(backend["url"])
                phase.add_metric([model, url, str(backend["phase"])], 1.0)
                for key, gauge in gauges.items():
                    gauge.add_metric([model, url], float(backend.get(key) or 0.0))
                kind = str(backend.get("kind", "bytes"))
                if kind in usable:
                    usable[kind].add_metric([model, url], float(backend.get("usable") or 0.0))
                if kind == "bytes":
                    reserved += float(backend.get("reserved_bytes") or 0.0)
                    planned += float(backend.get("usable") or 0.0)
            wanted.add_metric([model], reserved + queued_bytes)
            usable_bytes.add_metric([model], planned)
        yield phase
        yield from gauges.values()
        yield from usable.values()
        yield depth
        yield oldest
        yield from demand
