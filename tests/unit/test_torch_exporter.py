"""Fragmentation exporter on hand-written snapshots in the shape of
torch.cuda.memory_snapshot(): segments with blocks in active_allocated/active_pending_free/
inactive states. No GPU, no torch."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.backends.flavors import metric_map
from gateway.backends.parse import parse_metrics
from gateway.core.backend import Signals
from gateway.exporters.torch_memory import TorchMemoryCollector, analyze, stats_bytes

MIB = 1 << 20


def block(size: int, state: str, address: int = 0) -> dict[str, object]:
    return {"address": address, "size": size, "requested_size": size, "state": state, "frames": []}


def segment(device: int, *blocks: dict[str, object]) -> dict[str, object]:
    total = sum(int(b["size"]) for b in blocks)  # type: ignore[call-overload]
    return {
        "device": device,
        "address": 139_637_976_727_552,
        "total_size": total,
        "allocated_size": sum(int(b["size"]) for b in blocks if b["state"] != "inactive"),  # type: ignore[call-overload]
        "active_size": total,
        "requested_size": total,
        "stream": 0,
        "segment_type": "large",
        "segment_pool_id": (0, 0),
        "is_expandable": False,
        "frames": [],
        "blocks": list(blocks),
    }


SNAPSHOT = [
    segment(
        0,
        block(20 * MIB, "active_allocated"),
        block(4 * MIB, "inactive"),
        block(8 * MIB, "active_allocated"),
    ),
    segment(0, block(2 * MIB, "active_pending_free"), block(12 * MIB, "inactive")),
    segment(1, block(64 * MIB, "inactive")),  # another device: ignored
]


def test_fragmentation_from_inactive_blocks() -> None:
    r = analyze(SNAPSHOT, device=0)
    assert r.reserved_bytes == 46 * MIB
    assert r.allocated_bytes == 30 * MIB
    assert r.free_bytes == 16 * MIB
    assert r.largest_free_block_bytes == 12 * MIB
    assert r.fragmentation == pytest.approx(1 - 12 / 16)


def test_device_memory_outside_the_allocator_counts_as_free() -> None:
    r = analyze(SNAPSHOT, device=0, device_free_bytes=100 * MIB)
    assert r.largest_free_block_bytes == 100 * MIB
    assert r.fragmentation == pytest.approx(1 - 100 / 116)


def test_snapshot_dict_form_and_nothing_free() -> None:
    r = analyze({"segments": [segment(0, block(MIB, "active_allocated"))], "device_traces": []})
    assert r.fragmentation == 0.0
    assert r.free_bytes == 0
    assert analyze([]).reserved_bytes == 0


def test_stats_bytes() -> None:
    stats = {"reserved_bytes.all.current": 46 * MIB, "allocated_bytes.all.current": 30 * MIB}
    assert stats_bytes(stats) == (46 * MIB, 30 * MIB)


def test_collector_serves_gauges_that_kvgate_parses() -> None:
    registry = CollectorRegistry()
    registry.register(
        TorchMemoryCollector(
            0,
            snapshot_fn=lambda: SNAPSHOT,
            mem_get_info_fn=lambda device: (0, 80 << 30),
            memory_stats_fn=lambda device: {"reserved_bytes.all.current": 46 * MIB},
        )
    )
    assert registry.get_sample_value(
        "kvgate_gpu_fragmentation_ratio", {"device": "0"}
    ) == pytest.approx(0.25)
    assert registry.get_sample_value("kvgate_gpu_reserved_bytes", {"device": "0"}) == 46 * MIB
    text = generate_latest(registry).decode()
    sig = parse_metrics(text, metric_map(Signals.GENERIC), at=0.0)
    assert sig.fragmentation == pytest.approx(0.25)
    assert sig.largest_free_block_bytes == 12 * MIB
