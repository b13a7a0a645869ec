"""Prometheus exposition of the simulated GPU under vLLM's metric names, plus the fragmentation
gauges kvgate's PyTorch allocator exporter publishes. A collector reads the engine at scrape time
into a per-app registry, so several simulators can live in one process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.sim.allocator import fragmentation_ratio
from gateway.sim.config import SimConfig
from gateway.sim.runtime import SimRuntime

ENGINE = "0"  # vLLM labels every series with its engine's index; one engine here

# vLLM's cache_config_info labels (0.32) that a simulated GPU has no value of of its own
_CACHE_FIXED = {
    "cache_dtype": "auto",
    "calculate_kv_scales": "False",
    "cpu_offload_gb": "0",
    "gpu_memory_utilization": "0.9",
    "is_attention_free": "False",
    "num_cpu_blocks": "None",
    "num_gpu_blocks_override": "None",
    "prefix_caching_hash_algo": "builtin",
    "sliding_window": "None",
    "swap_space": "4",
}


def cache_config_labels(cfg: SimConfig) -> dict[str, str]:
    """vLLM's ``cache_config_info`` label set for this configuration."""
    tokens = cfg.kv_blocks * cfg.block_size
    return {
        **_CACHE_FIXED,
        "block_size": str(cfg.block_size),
        "enable_prefix_caching": str(cfg.prefix_caching),
        "num_gpu_blocks": str(cfg.kv_blocks),
        "kv_cache_size_tokens": str(tokens),
        "kv_cache_memory_bytes": str(tokens * cfg.kv_bytes_per_token),
        "swap_space_bytes": str(4 << 30),
    }


class SimCollector:
    """Every series carries ``model_name`` and ``engine``. Counters restart from zero after a
    crash or restart, as a real server process's do."""

    def __init__(self, runtime: SimRuntime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        engine = self._runtime.sync()
        cfg = engine.config
        label = ["model_name", "engine"]
        model = [cfg.model, ENGINE]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=label)
            family.add_metric(model, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=label)
            family.add_metric(model, value)
            return family

        counts = engine.stats.since_restart()
        free = engine.free_blocks()
        largest = engine.largest_free_blocks()
        yield gauge(
            "vllm:num_requests_running", "Requests in the running batch.", engine.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", engine.num_waiting
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage: 1 means every block is held.",
            engine.used_blocks / cfg.kv_blocks,
        )
        yield counter("vllm:num_preemptions", "Preempted sequences.", counts.preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", counts.prompt_tokens)
        yield counter("vllm:generation_tokens", "Generated tokens.", counts.generated_tokens)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            counts.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            counts.prefix_cache_hits,
        )
        cache = cache_config_labels(cfg)
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "KV-cache configuration.", labels=[*label, *cache]
        )
        info.add_metric([*model, *cache.values()], 1.0)
        yield info
        yield gauge(
            "kvgate_gpu_fragmentation_ratio",
            "Share of free KV memory no single allocation can use (1 - largest free / free).",
            fragmentation_ratio(free, largest),
        )
        yield gauge(
            "kvgate_gpu_largest_free_block_bytes",
            "Largest allocation of KV memory that can succeed now, in bytes.",
            largest * cfg.block_size * cfg.kv_bytes_per_token,
        )
        yield counter(
            "kvgate_sim_oom_errors", "Requests failed with CUDA out of memory.", counts.oom_errors
        )


def build_registry(runtime: SimRuntime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SimCollector(runtime))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in ``registry``."""
    return generate_latest(registry)
