"""Every Prometheus metric of the gateway, in one place, on a registry of its own (tests build one
per app). Base units, ``kvgate_`` prefix, bounded labels: tenant and model names come from the
policy, ``outcome`` from ``Outcome``; never request ids or keys."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        self._requests: defaultdict[tuple[str, str, str], float] = defaultdict(float)
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
        self.policy_info = Gauge(
            "kvgate_policy_info", "1 for the live policy.", ["fingerprint"], registry=r
        )
        self.store_degraded = Gauge(
            "kvgate_store_degraded",
            "1 while the shared limit store is unreachable and the fallback decides.",
            registry=r,
        )

    def count(self, tenant: str, model: str, outcome: str) -> None:
        self._requests[tenant, model, outcome] += 1.0

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
        self.policy_info.clear()
        self.policy_info.labels(fingerprint).set(1)


class _RequestCollector(Collector):
    """The request path's series, exported as prometheus_client's Counter and Histogram would be
    but without ``_created`` samples: the text format carries them as one more gauge series per
    child, which Prometheus does not read as creation times."""

    def __init__(
        self,
        requests: Mapping[tuple[str, str, str], float],
        settled: Mapping[tuple[str, str], _Settled],
        histograms: tuple[RequestHistogram, ...],
    ) -> None:
        self._requests = requests
        self._settled = settled
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "kvgate_requests", "Requests by how they ended.", labels=["tenant", "model", "outcome"]
        )
        for labels, value in self._requests.items():
            requests.add_metric(labels, value)
        yield requests
        for histogram in self._histograms:
            yield histogram.family()
        tokens = CounterMetricFamily(
            "kvgate_tokens", "Tokens settled from real usage.", labels=["tenant", "model", "kind"]
        )
        gib_s = CounterMetricFamily(
            "kvgate_kv_gib_seconds",
            "GPU KV-cache memory-time settled from real usage (GiB x seconds).",
            labels=["tenant", "model"],
        )
        for (tenant, model), settled in self._settled.items():
            tokens.add_metric([tenant, model, "input"], settled.input_tokens)
            tokens.add_metric([tenant, model, "output"], settled.output_tokens)
            gib_s.add_metric([tenant, model], settled.gib_s)
        yield tokens
        yield gib_s

    def describe(self) -> Iterator[Metric]:
        """The family names, so the registry refuses a second ``Metrics`` (a name clash) on it."""
        return self.collect()


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
