"""Backend responses -> signals: Prometheus text (prometheus_client's parser), health answers,
and the JSON of llama.cpp ``/props`` and TGI ``/info``. Pure functions; the monitor does I/O.

Several samples of one name (labels per engine, per model) combine as: counts and capacities
add up, shares (usage, fragmentation) take the maximum, the largest free block the maximum.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families

from gateway.backends.flavors import MetricMap
from gateway.core.backend import BackendSignals, Health

_LOADING_MARKERS = (b"Loading model", b"loading model")


class MetricsFormatError(ValueError):
    """The metrics endpoint answered something that is not the Prometheus text format."""


def parse_health(status: int, body: bytes) -> Health:
    """200 is OK; 503, or any answer saying the model is loading (llama.cpp answers every
    endpoint with 503 ``{"error": {"message": "Loading model", ...}}``), is LOADING; the rest
    FAILED. A refused connection is decided by the caller (LOADING for a configured backend)."""
    if any(marker in body for marker in _LOADING_MARKERS):
        return Health.LOADING
    if 200 <= status < 300:
        return Health.OK
    if status == 503:
        return Health.LOADING
    return Health.FAILED


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the exposition, by sample name (``_total`` etc. kept as written)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsFormatError(str(exc)) from exc
    return out


def parse_metrics(
    text: str, names: MetricMap, *, at: float, block_size: int | None = None
) -> BackendSignals:
    """Signals from one scrape. ``block_size`` (from the policy) converts a plain block-count
    gauge to tokens when the metric itself does not say its block size."""
    found = samples(text)

    def first(candidates: Iterable[str], combine: Callable[[list[float]], float]) -> float | None:
        for name in candidates:
            values = [v for _, v in found.get(name, ())]
            if values:
                return combine(values)
        return None

    capacity_tokens, metric_block = _capacity(found, names, block_size)
    tokens = first(names.capacity_tokens, sum)
    if capacity_tokens is None and tokens is not None:
        capacity_tokens = int(tokens)
    return BackendSignals(
        at=at,
        kv_usage=first(names.kv_usage, max),
        capacity_tokens=capacity_tokens,
        used_tokens=first(names.used_tokens, sum),
        block_size=metric_block,
        running=first(names.running, sum),
        waiting=first(names.waiting, sum),
        preemptions_total=first(names.preemptions, sum),
        fragmentation=first(names.fragmentation, max),
        largest_free_block_bytes=first(names.largest_free_block, max),
    )


def _capacity(
    found: dict[str, list[tuple[dict[str, str], float]]],
    names: MetricMap,
    block_size: int | None,
) -> tuple[int | None, int | None]:
    for name in names.capacity_blocks:
        rows = found.get(name) or found.get(name + "_info") or []
        total = 0
        size: int | None = None
        for labels, value in rows:
            if "num_gpu_blocks" in labels:
                blocks = _int(labels.get("num_gpu_blocks"))
                size = _int(labels.get("block_size")) or size
            else:
                blocks = int(value)
            total += blocks or 0
        if total:
            return total * (size or block_size or 16), size
    return None, None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def parse_props(body: bytes) -> tuple[int | None, int | None]:
    """llama.cpp ``/props`` -> (total_slots, context tokens per slot)."""
    data = _json_object(body)
    slots = data.get("total_slots")
    settings = data.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return (
        slots if isinstance(slots, int) and slots > 0 else None,
        n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None,
    )


def parse_tgi_info(body: bytes) -> int | None:
    """TGI ``/info`` -> ``max_batch_total_tokens`` (the KV pool in tokens)."""
    value = _json_object(body).get("max_batch_total_tokens")
    return value if isinstance(value, int) and value > 0 else None


def _json_object(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
