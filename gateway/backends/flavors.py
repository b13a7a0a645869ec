"""Metric names per backend flavor, merged with the policy's overrides (``metrics.names``).

Sources for the defaults (as documented by each project):
- vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``
  (older ``vllm:gpu_cache_usage_perc``; both a share in [0, 1]), ``vllm:num_preemptions_total``,
  ``vllm:cache_config_info`` whose labels carry ``num_gpu_blocks`` and ``block_size``.
- SGLang (``--enable-metrics``): ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:token_usage`` (share of the KV pool), ``sglang:max_total_num_tokens`` (KV pool size in
  tokens), ``sglang:num_retracted_requests_total`` (its preemptions, in newer builds).
- TGI: ``tgi_batch_current_size`` (running), ``tgi_queue_size`` (waiting),
  ``tgi_batch_current_max_tokens`` (tokens the current batch may reach); the pool size comes
  from ``GET /info`` ``max_batch_total_tokens``.
- llama.cpp (``--metrics``): ``llamacpp:requests_processing``, ``llamacpp:requests_deferred``,
  older builds ``llamacpp:kv_cache_usage_ratio``; slots from ``GET /props`` ``total_slots``.
- Every flavor: ``kvgate_gpu_fragmentation_ratio`` and ``kvgate_gpu_largest_free_block_bytes``,
  served by ``gateway.exporters.torch_memory`` and by the simulated backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.backend import MetricNames, Signals

FRAGMENTATION = "kvgate_gpu_fragmentation_ratio"
LARGEST_FREE_BLOCK = "kvgate_gpu_largest_free_block_bytes"


@dataclass(frozen=True, slots=True)
class MetricMap:
    """Which sample names feed which signal; for each, the first name present wins.

    ``capacity_blocks`` names either an info metric with ``num_gpu_blocks``/``block_size``
    labels (vLLM) or a gauge whose value is a block count. ``info_path`` is fetched as JSON for
    what the metrics do not tell (slots, pool size); ``scrape`` False means health only.
    """

    kv_usage: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    preemptions: tuple[str, ...] = ()
    capacity_blocks: tuple[str, ...] = ()
    capacity_tokens: tuple[str, ...] = ()
    used_tokens: tuple[str, ...] = ()
    fragmentation: tuple[str, ...] = (FRAGMENTATION,)
    largest_free_block: tuple[str, ...] = (LARGEST_FREE_BLOCK,)
    info_path: str | None = None
    scrape: bool = True


_FLAVORS: dict[Signals, MetricMap] = {
    Signals.VLLM: MetricMap(
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
        preemptions=("vllm:num_preemptions_total",),
        capacity_blocks=("vllm:cache_config_info",),
    ),
    Signals.SGLANG: MetricMap(
        kv_usage=("sglang:token_usage",),
        running=("sglang:num_running_reqs",),
        waiting=("sglang:num_queue_reqs",),
        preemptions=("sglang:num_retracted_requests_total",),
        capacity_tokens=("sglang:max_total_num_tokens",),
    ),
    Signals.TGI: MetricMap(
        running=("tgi_batch_current_size",),
        waiting=("tgi_queue_size",),
        used_tokens=("tgi_batch_current_max_tokens",),
        info_path="/info",
    ),
    Signals.LLAMACPP: MetricMap(
        kv_usage=("llamacpp:kv_cache_usage_ratio",),
        running=("llamacpp:requests_processing",),
        waiting=("llamacpp:requests_deferred",),
        info_path="/props",
    ),
    Signals.GENERIC: MetricMap(),
    Signals.NONE: MetricMap(fragmentation=(), largest_free_block=(), scrape=False),
}


def metric_map(signals: Signals, overrides: MetricNames) -> MetricMap:
    """The flavor's names with each policy override taking precedence."""
    base = _FLAVORS[signals]

    def pick(override: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
        return (override,) if override else default

    return MetricMap(
        kv_usage=pick(overrides.kv_usage, base.kv_usage),
        running=pick(overrides.running, base.running),
        waiting=pick(overrides.waiting, base.waiting),
        preemptions=pick(overrides.preemptions, base.preemptions),
        capacity_blocks=pick(overrides.capacity_blocks, base.capacity_blocks),
        capacity_tokens=base.capacity_tokens,
        used_tokens=base.used_tokens,
        fragmentation=pick(overrides.fragmentation, base.fragmentation),
        largest_free_block=pick(overrides.largest_free_block, base.largest_free_block),
        info_path=base.info_path,
        scrape=base.scrape
        or any(
            (
                overrides.kv_usage,
                overrides.running,
                overrides.waiting,
                overrides.preemptions,
                overrides.capacity_blocks,
                overrides.fragmentation,
                overrides.largest_free_block,
            )
        ),
    )
