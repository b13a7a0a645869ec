"""Fragmentation of PyTorch's CUDA caching allocator as Prometheus gauges.

A model server registers the collector next to its own metrics::

    from prometheus_client import REGISTRY
    from gateway.exporters.torch_memory import TorchMemoryCollector
    REGISTRY.register(TorchMemoryCollector(device=0))

and serves ``kvgate_gpu_fragmentation_ratio`` and ``kvgate_gpu_largest_free_block_bytes`` (plus
``kvgate_gpu_reserved_bytes`` and ``kvgate_gpu_allocated_bytes``), labelled by device.

The math (``analyze``) is a pure function over ``torch.cuda.memory_snapshot()``: a list of
segments (``device``, ``total_size``, ``blocks``), each block with ``size`` and ``state``
(``active_allocated``, ``active_pending_free`` or ``inactive``). Free memory is the inactive
blocks inside reserved segments plus, when given, device memory outside the allocator
(``torch.cuda.mem_get_info``), since a new segment can be carved from it. Then
``fragmentation = 1 - largest free block / free memory`` (0 when nothing is free): the share of
free memory that cannot hold one allocation of the largest size. torch is imported only when
the collector is built without injected functions, so this module loads without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

FRAGMENTATION = "kvgate_gpu_fragmentation_ratio"
LARGEST_FREE_BLOCK = "kvgate_gpu_largest_free_block_bytes"
RESERVED = "kvgate_gpu_reserved_bytes"
ALLOCATED = "kvgate_gpu_allocated_bytes"

Snapshot = Iterable[Mapping[str, object]] | Mapping[str, object]


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """Bytes on one device; ``fragmentation`` in [0, 1]."""

    reserved_bytes: int
    allocated_bytes: int
    free_bytes: int
    largest_free_block_bytes: int
    fragmentation: float


def analyze(snapshot: Snapshot, *, device: int = 0, device_free_bytes: int = 0) -> MemoryReport:
    """Fragmentation of one device from a snapshot (the list of segments, or the dict of
    ``torch.cuda.memory._snapshot()`` holding it under ``segments``)."""
    reserved = allocated = free = largest = 0
    for segment in _segments(snapshot):
        if _int(segment.get("device", device)) != device:
            continue
        reserved += _int(segment.get("total_size", 0))
        blocks = segment.get("blocks", ())
        if not isinstance(blocks, Iterable):
            continue
        for block in blocks:
            if not isinstance(block, Mapping):
                continue
            size = _int(block.get("size", 0))
            if block.get("state") == "inactive":
                free += size
                largest = max(largest, size)
            else:
                allocated += size
    outside = max(0, device_free_bytes)
    free += outside
    largest = max(largest, outside)
    ratio = 1.0 - largest / free if free > 0 else 0.0
    return MemoryReport(reserved, allocated, free, largest, ratio)


def stats_bytes(stats: Mapping[str, object]) -> tuple[int, int]:
    """(reserved, allocated) bytes now, from ``torch.cuda.memory_stats()``: the allocator's
    own counters, exact even when the snapshot omits segments of private pools."""
    return (
        _int(stats.get("reserved_bytes.all.current", 0)),
        _int(stats.get("allocated_bytes.all.current", 0)),
    )


def _segments(snapshot: Snapshot) -> Iterator[Mapping[str, object]]:
    items: object = snapshot.get("segments", ()) if isinstance(snapshot, Mapping) else snapshot
    if isinstance(items, Iterable):
        for segment in items:
            if isinstance(segment, Mapping):
                yield segment


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


class TorchMemoryCollector(Collector):
    """A prometheus_client custom collector reading the allocator at every scrape.

    ``snapshot_fn``, ``mem_get_info_fn`` and ``memory_stats_fn`` default to
    ``torch.cuda.memory_snapshot``, ``torch.cuda.mem_get_info`` and ``torch.cuda.memory_stats``;
    tests and non-CUDA hosts inject their own. Reserved and allocated bytes come from the
    stats; fragmentation and the largest free block from the snapshot.
    """

    def __init__(
        self,
        device: int = 0,
        *,
        snapshot_fn: Callable[[], Snapshot] | None = None,
        mem_get_info_fn: Callable[[int], tuple[int, int]] | None = None,
        memory_stats_fn: Callable[[int], Mapping[str, object]] | None = None,
    ) -> None:
        self.device = device
        if snapshot_fn is None or mem_get_info_fn is None or memory_stats_fn is None:
            cuda = importlib.import_module("torch.cuda")
            snapshot_fn = snapshot_fn or cuda.memory_snapshot
            mem_get_info_fn = mem_get_info_fn or cuda.mem_get_info
            memory_stats_fn = memory_stats_fn or cuda.memory_stats
        self._snapshot_fn = snapshot_fn
        self._mem_get_info_fn = mem_get_info_fn
        self._memory_stats_fn = memory_stats_fn

    def collect(self) -> Iterator[GaugeMetricFamily]:
        device_free, _total = self._mem_get_info_fn(self.device)
        report = analyze(self._snapshot_fn(), device=self.device, device_free_bytes=device_free)
        reserved, allocated = stats_bytes(self._memory_stats_fn(self.device))
        label = [str(self.device)]
        for name, doc, value in (
            (
                FRAGMENTATION,
                "Share of free GPU memory unusable by one allocation.",
                report.fragmentation,
            ),
            (
                LARGEST_FREE_BLOCK,
                "Largest allocation the GPU can serve now.",
                report.largest_free_block_bytes,
            ),
            (RESERVED, "Bytes the caching allocator holds from the driver.", reserved),
            (ALLOCATED, "Bytes in live tensors.", allocated),
        ):
            family = GaugeMetricFamily(name, doc, labels=["device"])
            family.add_metric(label, float(value))
            yield family
