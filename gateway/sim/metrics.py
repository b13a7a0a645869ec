"""Prometheus exposition of the simulated GPU under vLLM's metric names, plus the fragmentation
gauges kvgate's PyTorch allocator exporter publishes. A collector reads the engine at scrape time
into a per-app registry, so several simulators can live in one process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.sim.allocator import fragmentation_ratio
from gateway.sim.runtime import SimRuntime


class SimCollector:
    """Every series carries ``model_name``. Counters restart from zero after a crash or restart,
    as a real server process's do."""

    def __init__(self, runtime: SimRuntime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        engine = self._runtime.sync()
        cfg = engine.config
        label = ["model_name"]
        model = [cfg.model]

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
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "KV-cache configuration.",
            labels=["model_name", "num_gpu_blocks", "block_size"],
        )
        info.add_metric([cfg.model, str(cfg.kv_blocks), str(cfg.block_size)], 1.0)
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
