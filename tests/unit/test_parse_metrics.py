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
from gateway.core.backend import Signals
from gateway.core.lifecycle import Health

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

# A vLLM with two data-parallel engines, a build whose cache_config_info carries the
# group-aware capacity: on a hybrid model it is not num_gpu_blocks * block_size.
VLLM_DP_HYBRID = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen-next"} 6.0
vllm:num_requests_running{engine="1",model_name="qwen-next"} 4.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen-next"} 0.35
vllm:kv_cache_usage_perc{engine="1",model_name="qwen-next"} 0.2
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="64",cache_dtype="auto",enable_prefix_caching="True",\
engine="0",gpu_memory_utilization="0.9",kv_cache_size_tokens="196608",num_cpu_blocks="None",\
num_gpu_blocks="1024"} 1.0
vllm:cache_config_info{block_size="64",cache_dtype="auto",enable_prefix_caching="True",\
engine="1",gpu_memory_utilization="0.9",kv_cache_size_tokens="196608",num_cpu_blocks="None",\
num_gpu_blocks="1024"} 1.0
"""

# An older build: the label exists but was not set yet, so blocks * block size is used.
VLLM_UNSET_TOKENS = """\
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",kv_cache_size_tokens="None",\
num_gpu_blocks="500"} 1.0
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

# SGLang at TP 2 with priority scheduling: scheduler gauges come from tp_rank 0 only, the
# pool size and the retraction counter from every rank; request counts carry a total under
# priority="" and a per-priority breakdown.
SGLANG_TP2 = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="llama",moe_ep_rank="0",\
pp_rank="0",priority="",tp_rank="0"} 12.0
sglang:num_running_reqs{engine_type="unified",model_name="llama",moe_ep_rank="0",\
pp_rank="0",priority="0",tp_rank="0"} 8.0
sglang:num_running_reqs{engine_type="unified",model_name="llama",moe_ep_rank="0",\
pp_rank="0",priority="5",tp_rank="0"} 4.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="llama",moe_ep_rank="0",\
pp_rank="0",priority="",tp_rank="0"} 3.0
sglang:num_queue_reqs{engine_type="unified",model_name="llama",moe_ep_rank="0",\
pp_rank="0",priority="0",tp_rank="0"} 3.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="llama",moe_ep_rank="0",pp_rank="0",\
tp_rank="0"} 0.57
# HELP sglang:max_total_num_tokens Maximum total number of tokens in the KV cache pool.
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{engine_type="unified",model_name="llama",moe_ep_rank="0",\
pp_rank="0",tp_rank="0"} 412000.0
sglang:max_total_num_tokens{engine_type="unified",model_name="llama",moe_ep_rank="1",\
pp_rank="0",tp_rank="1"} 412000.0
# HELP sglang:num_retracted_requests_total Total number of retracted requests.
# TYPE sglang:num_retracted_requests_total counter
sglang:num_retracted_requests_total{engine_type="unified",model_name="llama",\
moe_ep_rank="0",pp_rank="0",tp_rank="0"} 5.0
sglang:num_retracted_requests_total{engine_type="unified",model_name="llama",\
moe_ep_rank="1",pp_rank="0",tp_rank="1"} 5.0
# HELP sglang:num_retracted_requests_created Total number of retracted requests.
# TYPE sglang:num_retracted_requests_created gauge
sglang:num_retracted_requests_created{engine_type="unified",model_name="llama",\
moe_ep_rank="0",pp_rank="0",tp_rank="0"} 1.7627e+09
"""

# SGLang with DP attention: each dp_rank has its own pool and queue, so those add up.
SGLANG_DP2 = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="ds",moe_ep_rank="0",\
pp_rank="0",tp_rank="0"} 10.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="ds",moe_ep_rank="2",\
pp_rank="0",tp_rank="2"} 7.0
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{dp_rank="0",engine_type="unified",model_name="ds",\
moe_ep_rank="0",pp_rank="0",tp_rank="0"} 90000.0
sglang:max_total_num_tokens{dp_rank="0",engine_type="unified",model_name="ds",\
moe_ep_rank="1",pp_rank="0",tp_rank="1"} 90000.0
sglang:max_total_num_tokens{dp_rank="1",engine_type="unified",model_name="ds",\
moe_ep_rank="2",pp_rank="0",tp_rank="2"} 90000.0
sglang:max_total_num_tokens{dp_rank="1",engine_type="unified",model_name="ds",\
moe_ep_rank="3",pp_rank="0",tp_rank="3"} 90000.0
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
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 5120
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 5
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 1.75
"""

# Builds before the 2025 removal also exported the KV usage ratio (used cells / n_ctx).
LLAMACPP_OLD = """\
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.4375
# HELP llamacpp:requests_processing Number of request processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
"""


def test_vllm() -> None:
    sig = parse_metrics(VLLM, metric_map(Signals.VLLM), at=5.0)
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
    sig = parse_metrics(VLLM_OLD, metric_map(Signals.VLLM), at=0.0)
    assert sig.kv_usage == pytest.approx(0.25)
    assert sig.capacity_tokens is None


def test_vllm_group_aware_capacity_per_engine() -> None:
    sig = parse_metrics(VLLM_DP_HYBRID, metric_map(Signals.VLLM), at=0.0)
    assert sig.running == 10.0
    assert sig.kv_usage == pytest.approx(0.35)
    assert sig.capacity_tokens == 2 * 196608  # not 2 * 1024 * 64
    assert sig.block_size == 64


def test_vllm_unset_token_label_falls_back_to_blocks() -> None:
    sig = parse_metrics(VLLM_UNSET_TOKENS, metric_map(Signals.VLLM), at=0.0)
    assert sig.capacity_tokens == 500 * 16
    assert sig.block_size == 16


def test_sglang() -> None:
    sig = parse_metrics(SGLANG, metric_map(Signals.SGLANG), at=0.0)
    assert (sig.running, sig.waiting) == (9.0, 2.0)
    assert sig.kv_usage == pytest.approx(0.28)
    assert sig.capacity_tokens == 161721


def test_sglang_tensor_parallel_copies_and_priority_breakdown() -> None:
    sig = parse_metrics(SGLANG_TP2, metric_map(Signals.SGLANG), at=0.0)
    assert (sig.running, sig.waiting) == (12.0, 3.0)  # totals, not total + breakdown
    assert sig.kv_usage == pytest.approx(0.57)
    assert sig.capacity_tokens == 412000  # one pool, written by both TP ranks
    assert sig.preemptions_total == 5.0


def test_sglang_data_parallel_ranks_add_up() -> None:
    sig = parse_metrics(SGLANG_DP2, metric_map(Signals.SGLANG), at=0.0)
    assert sig.running == 17.0
    assert sig.capacity_tokens == 2 * 90000


def test_rank_labels_merge_only_for_sglang() -> None:
    text = 'm_running{tp_rank="0"} 3\nm_running{tp_rank="1"} 3\n'
    generic = metric_map(Signals.GENERIC, [("running", "m_running")])
    assert parse_metrics(text, generic, at=0.0).running == 6.0


def test_tgi() -> None:
    sig = parse_metrics(TGI, metric_map(Signals.TGI), at=0.0)
    assert (sig.running, sig.waiting, sig.used_tokens) == (5.0, 11.0, 30000.0)
    assert metric_map(Signals.TGI).info_path == "/info"
    assert parse_tgi_info(b"garbage") is None


def test_tgi_info_older_and_current_router() -> None:
    old = (
        b'{"model_id":"bigscience/bloom-560m","model_dtype":"torch.float16",'
        b'"model_device_type":"cuda","max_concurrent_requests":128,"max_input_length":1024,'
        b'"max_total_tokens":2048,"waiting_served_ratio":1.2,"max_batch_total_tokens":120000,'
        b'"max_waiting_tokens":20,"validation_workers":2}'
    )
    assert parse_tgi_info(old) == 120000
    # Routers since the split into backends no longer report the batch token budget.
    new = (
        b'{"model_id":"meta-llama/Llama-3.1-8B-Instruct","max_concurrent_requests":128,'
        b'"max_best_of":2,"max_stop_sequences":4,"max_input_tokens":8191,'
        b'"max_total_tokens":8192,"validation_workers":2,"max_client_batch_size":4,'
        b'"router":"text-generation-router"}'
    )
    assert parse_tgi_info(new) is None


def test_llamacpp_and_props() -> None:
    sig = parse_metrics(LLAMACPP, metric_map(Signals.LLAMACPP), at=0.0)
    assert (sig.running, sig.waiting) == (2.0, 5.0)
    props = (
        b'{"default_generation_settings":{"params":{"n_predict":-1,"temperature":0.8},'
        b'"n_ctx":8192},"total_slots":4,"model_alias":"qwen","model_path":"/m/q.gguf",'
        b'"modalities":{"vision":false,"audio":false},"endpoint_metrics":true}'
    )
    assert parse_props(props) == (4, 8192)
    assert parse_props(b"[]") == (None, None)


def test_llamacpp_older_build_usage_ratio() -> None:
    sig = parse_metrics(LLAMACPP_OLD, metric_map(Signals.LLAMACPP), at=0.0)
    assert sig.kv_usage == pytest.approx(0.4375)
    assert sig.running == 1.0
    assert sig.waiting is None


def test_generic_names_from_policy_and_block_gauge() -> None:
    text = "my_usage 0.5\nmy_blocks 100\nmy_frag 0.1\n"
    overrides = [
        ("kv_usage", "my_usage"),
        ("capacity_blocks", "my_blocks"),
        ("fragmentation", "my_frag"),
    ]
    sig = parse_metrics(text, metric_map(Signals.GENERIC, overrides), at=0.0, block_size=32)
    assert sig.kv_usage == 0.5
    assert sig.capacity_tokens == 3200
    assert sig.fragmentation == pytest.approx(0.1)


def test_an_override_of_an_unknown_signal_is_an_error() -> None:
    with pytest.raises(ValueError, match="kv_usage_typo"):
        metric_map(Signals.VLLM, [("kv_usage_typo", "x")])


def test_override_replaces_a_flavor_default() -> None:
    m = metric_map(Signals.VLLM, [("kv_usage", "custom_usage")])
    assert m.kv_usage == ("custom_usage",)
    assert m.running == ("vllm:num_requests_running",)


def test_none_flavor_does_not_scrape_unless_names_are_given() -> None:
    assert not metric_map(Signals.NONE).scrape
    assert metric_map(Signals.NONE, [("fragmentation", "f")]).scrape


def test_garbage_is_a_format_error() -> None:
    with pytest.raises(MetricsFormatError):
        parse_metrics("this is { not prometheus", metric_map(Signals.VLLM), at=0.0)


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


@pytest.mark.parametrize(("flag", "expected"), [("True", True), ("False", False), (None, None)])
def test_vllm_says_whether_it_caches_prompt_prefixes(
    flag: str | None, expected: bool | None
) -> None:
    label = "" if flag is None else f',enable_prefix_caching="{flag}"'
    text = VLLM.replace('cache_dtype="auto"', f'cache_dtype="auto"{label}')
    sig = parse_metrics(text, metric_map(Signals.VLLM), at=0.0)
    assert sig.prefix_caching is expected
    assert sig.capacity_tokens == 2048 * 16
