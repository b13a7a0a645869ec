"""Metric names per backend flavor, merged with the policy's overrides (``metrics.names``).

Sources: every default below was checked against the projects' source (not a live server):
- vLLM (``vllm-project/vllm``, ``vllm/v1/metrics/loggers.py``, ``vllm/config/cache.py``):
  gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
  ``vllm:kv_cache_usage_perc`` (a share in [0, 1] despite the name), one sample per ``engine``
  (data-parallel rank) label. ``vllm:gpu_cache_usage_perc`` is the same share under its
  pre-0.9 name: deprecated in 0.9, hidden afterwards, removed late 2025, kept as a fallback.
  Counter ``vllm:num_preemptions`` is exported as ``vllm:num_preemptions_total`` (V0 declared
  it with the suffix; same exposition). ``vllm:cache_config_info`` is a gauge set to 1 whose
  labels are the cache config's fields, one sample per engine: ``num_gpu_blocks`` and
  ``block_size`` (the smallest block size of the KV groups on hybrid models, where blocks
  times block size is not the capacity) and, in builds with vLLM PR #42206 (2026),
  ``kv_cache_size_tokens`` (the engine's group-aware capacity in tokens), read first.
- SGLang (``--enable-metrics``; ``sgl-project/sglang``,
  ``python/sglang/srt/metrics/collector.py``, later moved to
  ``python/sglang/srt/observability/metrics_collector.py``):
  gauges ``sglang:num_running_reqs``, ``sglang:num_queue_reqs`` and ``sglang:token_usage`` (a
  share in [0, 1]; in recent builds the fullest of the full-attention, SWA and Mamba pools);
  ``sglang:max_total_num_tokens`` (the KV pool in tokens; absent from some 2025 builds) and
  counter ``sglang:num_retracted_requests_total`` (retractions, SGLang's preemptions; newer
  builds only: the older gauge ``sglang:num_retracted_reqs`` is a per-interval count, not a
  total, so it is not used). Labels carry ``tp_rank``, ``pp_rank`` and ``moe_ep_rank`` (and
  ``dp_rank`` with DP attention): the pool size and the retraction counter are written by
  every rank, so samples differing only in those rank labels are copies, not parts. With
  priority scheduling, request gauges add a per-priority breakdown (``priority="<n>"``) next
  to the total (``priority=""``).
- TGI (``huggingface/text-generation-inference``, ``backends/v3/src/backend.rs``,
  ``backends/v3/src/queue.rs``, ``router/src/server.rs``): unlabelled gauges
  ``tgi_batch_current_size`` (running), ``tgi_queue_size`` (waiting) and
  ``tgi_batch_current_max_tokens`` (tokens the running batch holds, in the unit of
  ``max_batch_total_tokens``); no preemption or usage-share metric. ``GET /info`` carries a
  top-level ``max_batch_total_tokens`` only from older routers: since the 2024 split into
  backends (``backends/v3``) the router builds ``Info`` without it, so the pool size of a
  current TGI must come from the policy.
- llama.cpp (``--metrics``; ``ggml-org/llama.cpp``, ``tools/server/server-task.cpp``,
  ``server-context.cpp``): unlabelled gauges ``llamacpp:requests_processing`` (busy slots) and
  ``llamacpp:requests_deferred`` (tasks waiting for a slot). ``llamacpp:kv_cache_usage_ratio``
  (used cells / n_ctx) was removed in 2025 (PR #13660) and is read only from older builds.
  ``GET /props``: top-level ``total_slots`` (``--parallel``) and
  ``default_generation_settings.n_ctx`` (context tokens of one slot).
- Every flavor: ``kvgate_gpu_fragmentation_ratio`` and ``kvgate_gpu_largest_free_block_bytes``,
  served by ``gateway.exporters.torch_memory`` and by the simulated backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.core.backend import Signals

FRAGMENTATION = "kvgate_gpu_fragmentation_ratio"
LARGEST_FREE_BLOCK = "kvgate_gpu_largest_free_block_bytes"


@dataclass(frozen=True, slots=True)
class MetricMap:
    """Which sample names feed which signal; for each, the first name present wins.

    ``capacity_blocks`` names either an info metric with ``kv_cache_size_tokens`` or
    ``num_gpu_blocks``/``block_size`` labels (vLLM) or a gauge whose value is a block count.
    ``info_path`` is fetched as JSON for what the metrics do not tell (slots, pool size);
    ``scrape`` False means health only.

    Samples of one name that differ only in ``mirror_labels`` are copies written by each rank
    of one engine (SGLang's tensor/pipeline/expert ranks): one of them counts, not their sum.
    A sample with a non-empty value in one of ``breakdown_labels`` is a part of a total that
    is also exported (SGLang's per-priority request counts) and is left out.
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
    mirror_labels: tuple[str, ...] = ()
    breakdown_labels: tuple[str, ...] = ()
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
        mirror_labels=("tp_rank", "pp_rank", "moe_ep_rank"),
        breakdown_labels=("priority",),
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


OVERRIDABLE = frozenset(
    (
        "kv_usage",
        "running",
        "waiting",
        "preemptions",
        "capacity_blocks",
        "fragmentation",
        "largest_free_block",
    )
)
"""The signals whose metric name a policy may set (``metrics.names``)."""


def metric_map(signals: Signals, overrides: Iterable[tuple[str, str]] = ()) -> MetricMap:
    """The flavor's names with each policy override (signal, metric name) taking precedence;
    naming any metric turns scraping on, also for ``signals: none``."""
    named: dict[str, Any] = {signal: (name,) for signal, name in overrides}
    unknown = set(named) - OVERRIDABLE
    if unknown:
        raise ValueError(f"no such signal to rename: {', '.join(sorted(unknown))}")
    base = _FLAVORS[signals]
    return dataclasses.replace(base, **named, scrape=base.scrape or bool(named))
