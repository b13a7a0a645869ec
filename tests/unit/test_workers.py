"""The process group's one /metrics page: every family once, each worker's samples labelled."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.bucket import BucketSpec
from gateway.core.clock import FakeClock
from gateway.core.types import Unit
from gateway.store.memory import MemoryLimitStore
from gateway.store.scaled import ScaledLimitStore
from gateway.workers import merge_expositions


def _page(requests: float, seconds: float) -> str:
    r = CollectorRegistry()
    Counter("kvgate_requests", "Requests.", ["tenant"], registry=r).labels("a").inc(requests)
    Counter("kvgate_plain", "No labels.", registry=r).inc()
    Histogram("kvgate_wait_seconds", "Waits.", registry=r, buckets=(1.0,)).observe(seconds)
    return generate_latest(r).decode()


def test_each_family_once_with_every_workers_samples_labelled() -> None:
    merged = merge_expositions([("0", _page(2, 0.5)), ("1", _page(3, 2.0))])
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    requests = families["kvgate_requests"]
    got = {
        (s.labels["worker"], s.labels["tenant"]): s.value
        for s in requests.samples
        if s.name.endswith("_total")
    }
    assert got == {("0", "a"): 2.0, ("1", "a"): 3.0}
    plain = [s for s in families["kvgate_plain"].samples if s.name.endswith("_total")]
    assert {s.labels["worker"] for s in plain} == {"0", "1"}
    buckets = {
        (s.labels["worker"], s.labels["le"]): s.value
        for s in families["kvgate_wait_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets == {("0", "1.0"): 1.0, ("0", "+Inf"): 1.0, ("1", "1.0"): 0.0, ("1", "+Inf"): 1.0}
    assert merged.count("# TYPE kvgate_requests_total counter\n") == 1


async def test_a_worker_of_n_with_the_memory_store_keeps_one_nth_of_every_bucket() -> None:
    spec = BucketSpec("t:a:*:requests:1", Unit.REQUESTS, rate_per_s=10.0, burst=10.0)
    store = ScaledLimitStore(MemoryLimitStore(FakeClock()), 1 / 2)
    verdicts = [store.acquire_now([spec], [1.0]) for _ in range(6)]
    assert [v is not None and v.allowed for v in verdicts] == [True] * 5 + [False]
    assert await store.peek([spec]) == (pytest.approx(0.0, abs=1e-9),)
