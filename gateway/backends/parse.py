"""Backend responses -> signals: Prometheus text (prometheus_client's parser), health answers,
and the JSON of llama.cpp ``/props`` and TGI ``/info``. Pure functions; the monitor does I/O.

Several samples of one name (labels per engine, per model) combine as: counts and capacities
add up, shares (usage, fragmentation) take the maximum, the largest free block the maximum.
Before that, the flavor's per-rank copies are merged into one sample and its breakdowns of
an exported total are dropped (``MetricMap.mirror_labels``, ``MetricMap.breakdown_labels``).

A vLLM page holds some 570 lines, almost all histogram buckets no signal reads: only the lines
of the sample names a flavor reads are kept before the parser sees the page (``needed_lines``),
which cuts a scrape's parse from milliseconds of event-loop time to a fraction of one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families

from gateway.backends.flavors import MetricMap
from gateway.core.backend import BackendSignals
from gateway.core.lifecycle import Health

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


@functools.lru_cache(maxsize=64)
def wanted_names(names: MetricMap) -> frozenset[str]:
    """Every sample name a signal of ``names`` may read (an info metric also as ``_info``)."""
    wanted = {
        n
        for group in (
            names.kv_usage,
            names.running,
            names.waiting,
            names.preemptions,
            names.capacity_tokens,
            names.used_tokens,
            names.fragmentation,
            names.largest_free_block,
        )
        for n in group
    }
    for name in names.capacity_blocks:
        wanted |= {name, name + "_info"}
    return frozenset(wanted)


def needed_lines(text: str, wanted: frozenset[str]) -> str:
    """The sample lines of ``text`` whose name is in ``wanted`` (comments dropped: the parser
    reads untyped samples by the names they are written with, as typed ones)."""
    prefixes = tuple(wanted)
    keep = []
    for line in text.splitlines():
        if line.startswith(prefixes):
            end = len(line)
            for stop in ("{", " "):
                at = line.find(stop)
                if 0 <= at < end:
                    end = at
            if line[:end] in wanted:
                keep.append(line)
    keep.append("")
    return "\n".join(keep)


def _needed_or_all(text: str, names: MetricMap) -> str:
    """The needed lines; the whole page when none is there, so that a page that is not the
    Prometheus format at all is still reported as such (it has none of the names either)."""
    kept = needed_lines(text, wanted_names(names))
    return kept if kept.strip() else text


def parse_metrics(
    text: str, names: MetricMap, *, at: float, block_size: int | None = None
) -> BackendSignals:
    """Signals from one scrape. ``block_size`` (from the policy) converts a plain block-count
    gauge to tokens when the metric itself does not say its block size."""
    found = {
        name: _distinct(rows, names.mirror_labels, names.breakdown_labels)
        for name, rows in samples(_needed_or_all(text, names)).items()
    }

    def first(candidates: Iterable[str], combine: Callable[[list[float]], float]) -> float | None:
        for name in candidates:
            values = [v for _, v in found.get(name, ())]
            if values:
                return combine(values)
        return None

    capacity_tokens, metric_block = _capacity(found, names, block_size)
    prefix_caching = _prefix_caching(found, names)
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
        prefix_caching=prefix_caching,
    )


def _distinct(
    rows: list[tuple[dict[str, str], float]],
    mirror: tuple[str, ...],
    breakdown: tuple[str, ...],
) -> list[tuple[dict[str, str], float]]:
    """The samples that are not copies or parts of others: breakdowns (a non-empty value in a
    ``breakdown`` label) are dropped, and samples equal but for ``mirror`` labels merge into
    one (the largest; the copies should agree)."""
    if not mirror and not breakdown:
        return rows
    merged: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], float]] = {}
    for labels, value in rows:
        if any(labels.get(label) for label in breakdown):
            continue
        key = tuple(sorted((k, v) for k, v in labels.items() if k not in mirror))
        kept = merged.get(key)
        if kept is None or value > kept[1]:
            merged[key] = (labels, value)
    return list(merged.values())


def _capacity(
    found: dict[str, list[tuple[dict[str, str], float]]],
    names: MetricMap,
    block_size: int | None,
) -> tuple[int | None, int | None]:
    """KV pool in tokens, and the block size the metric states. An info sample (vLLM's
    ``cache_config_info``) gives ``kv_cache_size_tokens`` where the build has it (right for
    hybrid models too), else ``num_gpu_blocks`` times its ``block_size``; any other sample's
    value is a block count."""
    for name in names.capacity_blocks:
        rows = found.get(name) or found.get(name + "_info") or []
        total = 0
        size: int | None = None
        for labels, value in rows:
            if "num_gpu_blocks" in labels or "kv_cache_size_tokens" in labels:
                row_size = _int(labels.get("block_size"))
                size = row_size or size
                tokens = _int(labels.get("kv_cache_size_tokens"))
                if not tokens or tokens <= 0:
                    blocks = _int(labels.get("num_gpu_blocks")) or 0
                    tokens = blocks * (row_size or block_size or 16)
            else:
                tokens = int(value) * (block_size or 16)
            total += max(tokens, 0)
        if total:
            return total, size
    return None, None


def _prefix_caching(
    found: dict[str, list[tuple[dict[str, str], float]]], names: MetricMap
) -> bool | None:
    """vLLM's ``cache_config_info`` says in ``enable_prefix_caching`` (``True``/``False``)
    whether the engine reuses cached prompt prefixes; None where no sample says."""
    for name in names.capacity_blocks:
        for labels, _ in found.get(name) or found.get(name + "_info") or []:
            flag = labels.get("enable_prefix_caching")
            if flag is not None:
                return flag.strip().lower() == "true"
    return None


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
