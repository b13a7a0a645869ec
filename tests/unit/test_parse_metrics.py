"""Prometheus text -> BackendSignals for each flavor; health answers; /props and /info."""

from __future__ import annotations

import pytest

from gateway.backends.flavors import metric_map
from gateway.backends.parse import (
    MetricsFormatError,
    parse_health,
    parse_metrics,
    parse_props,
    parse_tgi_info,
)
from gateway.core.backend import Health, MetricNames, Signals

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 12.0
vllm:num_requests_running{engine="1",model_name="llama"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.61
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="llama"} 7.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="2048"} 1.0
# HELP kvgate_gpu_fragmentation_ratio Share of free GPU memory unusable by one allocation.
# TYPE kvgate_gpu_fragmentation_ratio gauge
kvgate_gpu_fragmentation_ratio 0.3
# TYPE kvgate_gpu_largest_free_block_bytes gauge
kvgate_gpu_largest_free_block_bytes 1.048576e+06
"""

VLLM_OLD = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="llama"} 0.25
"""

SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 9.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.28
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{model_name="m"} 161721.0
"""

TGI = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_queue_size gauge
tgi_queue_size 11
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 30000
"""

LLAMACPP = """\
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 5
"""


def test_vllm() -> None:
    sig = parse_metrics(VLLM, metric_map(Signals.VLLM, MetricNames()), at=5.0)
    assert sig.at == 5.0
    assert sig.running == 15.0
    assert sig.waiting == 4.0
    assert sig.kv_usage == pytest.approx(0.61)  # the fuller engine
    assert sig.preemptions_total == 7.0
    assert sig.capacity_tokens == 2048 * 16
    assert sig.block_size == 16
    assert sig.fragmentation == pytest.approx(0.3)
    assert sig.largest_free_block_bytes == 1048576.0


def test_vllm_older_usage_name() -> None:
    sig = parse_metrics(VLLM_OLD, metric_map(Signals.VLLM, MetricNames()), at=0.0)
    assert sig.kv_usage == pytest.approx(0.25)
    assert sig.capacity_tokens is None


def test_sglang() -> None:
    sig = parse_metrics(SGLANG, metric_map(Signals.SGLANG, MetricNames()), at=0.0)
    assert (sig.running, sig.waiting) == (9.0, 2.0)
    assert sig.kv_usage == pytest.approx(0.28)
    assert sig.capacity_tokens == 161721


def test_tgi() -> None:
    sig = parse_metrics(TGI, metric_map(Signals.TGI, MetricNames()), at=0.0)
    assert (sig.running, sig.waiting, sig.used_tokens) == (5.0, 11.0, 30000.0)
    assert metric_map(Signals.TGI, MetricNames()).info_path == "/info"
    assert parse_tgi_info(b'{"max_batch_total_tokens": 120000, "model_id": "x"}') == 120000
    assert parse_tgi_info(b"garbage") is None


def test_llamacpp_and_props() -> None:
    sig = parse_metrics(LLAMACPP, metric_map(Signals.LLAMACPP, MetricNames()), at=0.0)
    assert (sig.running, sig.waiting) == (2.0, 5.0)
    props = b'{"total_slots": 4, "default_generation_settings": {"n_ctx": 8192}}'
    assert parse_props(props) == (4, 8192)
    assert parse_props(b"[]") == (None, None)


def test_generic_names_from_policy_and_block_gauge() -> None:
    text = "my_usage 0.5\nmy_blocks 100\nmy_frag 0.1\n"
    overrides = MetricNames(
        kv_usage="my_usage", capacity_blocks="my_blocks", fragmentation="my_frag"
    )
    sig = parse_metrics(text, metric_map(Signals.GENERIC, overrides), at=0.0, block_size=32)
    assert sig.kv_usage == 0.5
    assert sig.capacity_tokens == 3200
    assert sig.fragmentation == pytest.approx(0.1)


def test_override_replaces_a_flavor_default() -> None:
    m = metric_map(Signals.VLLM, MetricNames(kv_usage="custom_usage"))
    assert m.kv_usage == ("custom_usage",)
    assert m.running == ("vllm:num_requests_running",)


def test_none_flavor_does_not_scrape_unless_names_are_given() -> None:
    assert not metric_map(Signals.NONE, MetricNames()).scrape
    assert metric_map(Signals.NONE, MetricNames(fragmentation="f")).scrape


def test_garbage_is_a_format_error() -> None:
    with pytest.raises(MetricsFormatError):
        parse_metrics("this is { not prometheus", metric_map(Signals.VLLM, MetricNames()), at=0.0)


@pytest.mark.parametrize(
    ("status", "body", "health"),
    [
        (200, b'{"status": "ok"}', Health.OK),
        (200, b"", Health.OK),
        (503, b"", Health.LOADING),
        (
            503,
            b'{"error": {"message": "Loading model", "type": "unavailable_error"}}',
            Health.LOADING,
        ),
        (500, b"boom", Health.FAILED),
        (404, b"", Health.FAILED),
    ],
)
def test_health(status: int, body: bytes, health: Health) -> None:
    assert parse_health(status, body) is health
