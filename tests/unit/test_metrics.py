"""The request path's metrics, read back from the text exposition as Prometheus would scrape it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway import __version__
from gateway.metrics import Metrics

Labels = tuple[tuple[str, str], ...]


def _record(m: Metrics) -> None:
    m.count("acme", "llama", "ok", 200)
    m.count("acme", "llama", "rate_limited", 429)
    m.count("acme", "llama", "ok", 200)
    m.count("unknown", "unknown", "unauthorized", 401)
    m.settled("acme", "llama", 120, 30, 0.75)
    m.settled("beta", "qwen", 7, 0, 1e-06)
    m.settled("acme", "llama", 5, 2, 0.125)
    m.timed(m.duration, "llama", 0.1)
    m.timed(m.duration, "llama", 0.10000001)
    m.timed(m.duration, "llama", 301.0)
    m.timed(m.duration, "qwen", 0.0)
    m.timed(m.ttft, "llama", 0.005)
    m.timed(m.queue_wait, "qwen", 60)
    m.policy_reloads.labels("ok").inc()
    m.set_policy("abc123")


# generate_latest() after _record() when every metric was a prometheus_client Counter or
# Histogram, its *_created series left out (see _without_created).
OLD_EXPOSITION = """\
# HELP kvgate_requests_total Requests by how they ended and the HTTP status the client got.
# TYPE kvgate_requests_total counter
kvgate_requests_total{model="llama",outcome="ok",status="200",tenant="acme"} 2.0
kvgate_requests_total{model="llama",outcome="rate_limited",status="429",tenant="acme"} 1.0
kvgate_requests_total{model="unknown",outcome="unauthorized",status="401",tenant="unknown"} 1.0
# HELP kvgate_request_duration_seconds Time from request to the last byte of the answer, admitted requests.
# TYPE kvgate_request_duration_seconds histogram
kvgate_request_duration_seconds_bucket{le="0.005",model="llama"} 0.0
kvgate_request_duration_seconds_bucket{le="0.01",model="llama"} 0.0
kvgate_request_duration_seconds_bucket{le="0.025",model="llama"} 0.0
kvgate_request_duration_seconds_bucket{le="0.05",model="llama"} 0.0
kvgate_request_duration_seconds_bucket{le="0.1",model="llama"} 1.0
kvgate_request_duration_seconds_bucket{le="0.25",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="0.5",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="1.0",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="2.5",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="5.0",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="10.0",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="30.0",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="60.0",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="120.0",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="300.0",model="llama"} 2.0
kvgate_request_duration_seconds_bucket{le="+Inf",model="llama"} 3.0
kvgate_request_duration_seconds_count{model="llama"} 3.0
kvgate_request_duration_seconds_sum{model="llama"} 301.20000001
kvgate_request_duration_seconds_bucket{le="0.005",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="0.01",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="0.025",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="0.05",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="0.1",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="0.25",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="0.5",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="1.0",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="2.5",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="5.0",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="10.0",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="30.0",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="60.0",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="120.0",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="300.0",model="qwen"} 1.0
kvgate_request_duration_seconds_bucket{le="+Inf",model="qwen"} 1.0
kvgate_request_duration_seconds_count{model="qwen"} 1.0
kvgate_request_duration_seconds_sum{model="qwen"} 0.0
# HELP kvgate_upstream_first_byte_seconds Time from forwarding to the first token: a stream's first event, else the headers.
# TYPE kvgate_upstream_first_byte_seconds histogram
kvgate_upstream_first_byte_seconds_bucket{le="0.005",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="0.01",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="0.025",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="0.05",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="0.1",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="0.25",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="0.5",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="1.0",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="2.5",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="5.0",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="10.0",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="30.0",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="60.0",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="120.0",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="300.0",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_bucket{le="+Inf",model="llama"} 1.0
kvgate_upstream_first_byte_seconds_count{model="llama"} 1.0
kvgate_upstream_first_byte_seconds_sum{model="llama"} 0.005
# HELP kvgate_queue_wait_seconds Time admitted requests waited for GPU memory.
# TYPE kvgate_queue_wait_seconds histogram
kvgate_queue_wait_seconds_bucket{le="0.005",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="0.01",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="0.025",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="0.05",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="0.1",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="0.25",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="0.5",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="1.0",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="2.5",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="5.0",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="10.0",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="30.0",model="qwen"} 0.0
kvgate_queue_wait_seconds_bucket{le="60.0",model="qwen"} 1.0
kvgate_queue_wait_seconds_bucket{le="120.0",model="qwen"} 1.0
kvgate_queue_wait_seconds_bucket{le="300.0",model="qwen"} 1.0
kvgate_queue_wait_seconds_bucket{le="+Inf",model="qwen"} 1.0
kvgate_queue_wait_seconds_count{model="qwen"} 1.0
kvgate_queue_wait_seconds_sum{model="qwen"} 60.0
# HELP kvgate_tokens_total Tokens settled from real usage.
# TYPE kvgate_tokens_total counter
kvgate_tokens_total{kind="input",model="llama",tenant="acme"} 125.0
kvgate_tokens_total{kind="output",model="llama",tenant="acme"} 32.0
kvgate_tokens_total{kind="input",model="qwen",tenant="beta"} 7.0
kvgate_tokens_total{kind="output",model="qwen",tenant="beta"} 0.0
# HELP kvgate_kv_byte_seconds_total GPU KV-cache memory-time settled from real usage (bytes x seconds).
# TYPE kvgate_kv_byte_seconds_total counter
kvgate_kv_byte_seconds_total{model="llama",tenant="acme"} 9.39524096e+08
kvgate_kv_byte_seconds_total{model="qwen",tenant="beta"} 1073.741824
# HELP kvgate_policy_reloads_total Policy reloads by result.
# TYPE kvgate_policy_reloads_total counter
kvgate_policy_reloads_total{result="ok"} 1.0
# HELP kvgate_uncosted_requests_total Requests on paths without cost rules let through by server.unknown_endpoints.
# TYPE kvgate_uncosted_requests_total counter
# HELP kvgate_connections_refused_total Client connections answered 503 and closed at a cap (per_client, global).
# TYPE kvgate_connections_refused_total counter
# HELP kvgate_connections_timed_out_total Client connections closed at a phase deadline (first_request, headers, idle).
# TYPE kvgate_connections_timed_out_total counter
# HELP kvgate_internal_errors_total Requests that met an unexpected exception, answered 500 (logged, rate-limited).
# TYPE kvgate_internal_errors_total counter
kvgate_internal_errors_total 0.0
# HELP kvgate_asyncio_tasks Tasks on the event loop at the last scrape.
# TYPE kvgate_asyncio_tasks gauge
kvgate_asyncio_tasks 0.0
# HELP kvgate_policy_info 1 for the live policy.
# TYPE kvgate_policy_info gauge
kvgate_policy_info{fingerprint="abc123"} 1.0
# HELP kvgate_policy_last_reload_success_timestamp_seconds Unix time the live policy was loaded (at start or by the last successful reload).
# TYPE kvgate_policy_last_reload_success_timestamp_seconds gauge
kvgate_policy_last_reload_success_timestamp_seconds LOADED
# HELP kvgate_build_info 1, labelled with the version.
# TYPE kvgate_build_info gauge
kvgate_build_info{version="VERSION"} 1.0
# HELP kvgate_store_degraded 1 while the shared limit store is unreachable and the fallback decides.
# TYPE kvgate_store_degraded gauge
kvgate_store_degraded 0.0
"""  # noqa: E501

_CREATED = re.compile(r"^(# (HELP|TYPE) )?\w+_created[ {]")
_LOADED = re.compile(r"^(kvgate_policy_last_reload_success_timestamp_seconds) (\S+)$")


def _expected(loaded: bool) -> list[str]:
    text = OLD_EXPOSITION.replace("VERSION", __version__)
    return text.replace("LOADED", "WHEN" if loaded else "0.0").splitlines()


def _when(lines: list[str]) -> list[str]:
    """The load time of the policy (a wall clock reading) as WHEN, once checked to be one."""
    out = []
    for line in lines:
        match = _LOADED.match(line)
        if match and float(match.group(2)) > 1.6e9:
            line = f"{match.group(1)} WHEN"
        out.append(line)
    return out


def _lines(m: Metrics) -> list[str]:
    return generate_latest(m.registry).decode().splitlines()


def _without_created(lines: list[str]) -> list[str]:
    return [line for line in lines if not _CREATED.match(line)]


def _scrape(m: Metrics) -> dict[str, dict[Labels, float]]:
    """Sample name -> label set -> value, parsed from the text exposition."""
    samples: dict[str, dict[Labels, float]] = {}
    text = generate_latest(m.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def _buckets(m: Metrics, name: str, model: str) -> dict[str, float]:
    series = _scrape(m)[f"{name}_bucket"]
    return {dict(labels)["le"]: v for labels, v in series.items() if dict(labels)["model"] == model}


def test_exposition_is_the_one_prometheus_client_made() -> None:
    m = Metrics()
    _record(m)
    assert _when(_without_created(_lines(m))) == _expected(loaded=True)


def test_fresh_exposition_is_the_one_prometheus_client_made() -> None:
    expected = _expected(loaded=False)
    kept = (
        "# ",
        "kvgate_store_degraded",
        "kvgate_build_info",
        "kvgate_policy_last_reload",
        "kvgate_internal_errors_total",
        "kvgate_asyncio_tasks",
    )
    assert _without_created(_lines(Metrics())) == [x for x in expected if x.startswith(kept)]


def test_request_path_series_have_no_created_samples() -> None:
    m = Metrics()
    _record(m)
    created = {name for name in _scrape(m) if name.endswith("_created")}
    # prometheus_client counters outside the hot path keep theirs
    assert created == {"kvgate_policy_reloads_created", "kvgate_internal_errors_created"}


def test_requests_are_counted_per_label_set() -> None:
    m = Metrics()
    _record(m)
    m.count("beta", "qwen", "ok", 200)
    m.count("beta", "qwen", "upstream_client_error", 404)
    requests = _scrape(m)["kvgate_requests_total"]

    def key(model: str, outcome: str, status: str, tenant: str) -> Labels:
        return (("model", model), ("outcome", outcome), ("status", status), ("tenant", tenant))

    assert requests == {
        key("llama", "ok", "200", "acme"): 2.0,
        key("llama", "rate_limited", "429", "acme"): 1.0,
        key("unknown", "unauthorized", "401", "unknown"): 1.0,
        key("qwen", "ok", "200", "beta"): 1.0,
        key("qwen", "upstream_client_error", "404", "beta"): 1.0,
    }


def test_settled_usage_adds_up_per_tenant_and_model() -> None:
    m = Metrics()
    _record(m)
    samples = _scrape(m)
    assert samples["kvgate_tokens_total"] == {
        (("kind", "input"), ("model", "llama"), ("tenant", "acme")): 125.0,
        (("kind", "output"), ("model", "llama"), ("tenant", "acme")): 32.0,
        (("kind", "input"), ("model", "qwen"), ("tenant", "beta")): 7.0,
        (("kind", "output"), ("model", "qwen"), ("tenant", "beta")): 0.0,
    }
    assert samples["kvgate_kv_byte_seconds_total"] == {
        (("model", "llama"), ("tenant", "acme")): 0.875 * 2**30,
        (("model", "qwen"), ("tenant", "beta")): 1e-06 * 2**30,
    }


def test_a_bound_is_counted_in_its_own_bucket_and_just_above_in_the_next() -> None:
    m = Metrics()
    m.timed(m.duration, "llama", 0.1)
    m.timed(m.duration, "llama", 0.10000001)
    buckets = _buckets(m, "kvgate_request_duration_seconds", "llama")
    assert (buckets["0.05"], buckets["0.1"], buckets["0.25"], buckets["+Inf"]) == (0, 1, 2, 2)


def test_past_the_last_bound_only_inf_counts() -> None:
    m = Metrics()
    m.timed(m.ttft, "llama", 300.0)
    m.timed(m.ttft, "llama", 300.5)
    samples = _scrape(m)
    buckets = _buckets(m, "kvgate_upstream_first_byte_seconds", "llama")
    assert (buckets["120.0"], buckets["300.0"], buckets["+Inf"]) == (0, 1, 2)
    labels = (("model", "llama"),)
    assert samples["kvgate_upstream_first_byte_seconds_count"][labels] == 2
    assert samples["kvgate_upstream_first_byte_seconds_sum"][labels] == 600.5


def test_histograms_keep_models_and_metrics_apart() -> None:
    m = Metrics()
    m.timed(m.queue_wait, "llama", 0.02)
    m.timed(m.queue_wait, "qwen", 3.0)
    m.timed(m.queue_wait, "qwen", 4.0)
    samples = _scrape(m)
    assert samples["kvgate_queue_wait_seconds_count"] == {
        (("model", "llama"),): 1,
        (("model", "qwen"),): 2,
    }
    assert samples["kvgate_queue_wait_seconds_sum"] == {
        (("model", "llama"),): 0.02,
        (("model", "qwen"),): 7.0,
    }
    assert _buckets(m, "kvgate_queue_wait_seconds", "qwen")["2.5"] == 0
    assert _buckets(m, "kvgate_queue_wait_seconds", "qwen")["5.0"] == 2
    assert "kvgate_request_duration_seconds_count" not in samples


def test_a_second_metrics_on_one_registry_is_refused() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)


def _histogram_samples(registry: CollectorRegistry, name: str) -> list[Sample]:
    return [
        sample
        for family in registry.collect()
        if family.name == name
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["llama", "qwen"]),
            st.one_of(st.sampled_from([0.005, 1, 2.5, 300]), st.floats(min_value=-1.0)),
        ),
        max_size=30,
    )
)
def test_histograms_match_prometheus_client_on_any_observations(
    observations: list[tuple[str, float]],
) -> None:
    m = Metrics()
    reference = CollectorRegistry()
    old = Histogram(
        m.duration.name,
        m.duration.documentation,
        ["model"],
        buckets=m.duration.bounds,
        registry=reference,
    )
    for model, seconds in observations:
        m.timed(m.duration, model, seconds)
        old.labels(model).observe(seconds)
    name = m.duration.name
    assert _histogram_samples(m.registry, name) == _histogram_samples(reference, name)
