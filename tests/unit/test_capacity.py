"""Usable capacity of one backend: headroom, warm-up, fragmentation, usage gauge, staleness,
pressure, slots and adaptive concurrency."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.backend import BackendConfig, BackendRuntime, BackendSignals, MemoryKind, Signals
from gateway.core.capacity import CapacityConfig, CapacityKind, Pressure, round_up_tokens
from gateway.core.clock import FakeClock
from gateway.core.lifecycle import Health

GIB = 1 << 30
KVT = 131072  # bytes per token, Llama-3.1-8B bf16


def runtime(clock: FakeClock, *, cap: CapacityConfig | None = None, **kw: object) -> BackendRuntime:
    kw.setdefault("kv_capacity_bytes", 10 * GIB)
    config = BackendConfig(url="http://b", **kw)  # type: ignore[arg-type]
    rt = BackendRuntime(
        config, kv_bytes_per_token=KVT, cap=cap or CapacityConfig(headroom=0.1), now=clock.now()
    )
    rt.lifecycle.observe_health(Health.OK, clock.now())
    return rt


def test_usable_is_capacity_minus_headroom_minus_reserved() -> None:
    clock = FakeClock()
    rt = runtime(clock)
    v = rt.view(clock.now())
    assert v.kind is CapacityKind.BYTES
    assert v.usable == pytest.approx(9 * GIB)
    rt.place(2 * GIB)
    assert rt.view(clock.now()).free == pytest.approx(7 * GIB)
    rt.unplace(2 * GIB)
    assert rt.view(clock.now()).free == pytest.approx(9 * GIB)


def test_warmup_scales_usable() -> None:
    clock = FakeClock()
    rt = BackendRuntime(
        BackendConfig(url="b", kv_capacity_bytes=10 * GIB, warmup_s=10.0),
        kv_bytes_per_token=KVT,
        cap=CapacityConfig(headroom=0.0, warmup_floor=0.2),
        now=clock.now(),
    )
    rt.lifecycle.observe_health(Health.LOADING, clock.now())
    assert rt.view(clock.now()).usable == 0
    assert _score(rt, 1, clock.now()) is None
    rt.lifecycle.observe_health(Health.OK, clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(2 * GIB)
    rt.place(GIB)
    rt.place(GIB)
    rt.apply_signals(BackendSignals(at=clock.now(), running=2, waiting=0), clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(2 * GIB)  # not measured yet: held
    rt.finished(GIB, failure=None, ttft_s=1.5, now=clock.now())  # its first answer
    clock.advance(0.2)
    rt.apply_signals(BackendSignals(at=clock.now(), running=1, waiting=0), clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(4 * GIB)  # it kept up, half used
    clock.advance(0.2)
    rt.apply_signals(BackendSignals(at=clock.now(), running=1, waiting=0), clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(4 * GIB)  # a quarter used: earned nothing
    rt.place(2 * GIB)
    clock.advance(0.2)
    rt.apply_signals(BackendSignals(at=clock.now(), running=3, waiting=0), clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(8 * GIB)


def test_a_warming_backend_whose_queue_stands_gets_less() -> None:
    clock = FakeClock()
    rt = BackendRuntime(
        BackendConfig(url="b", kv_capacity_bytes=10 * GIB, warmup_s=10.0),
        kv_bytes_per_token=KVT,
        cap=CapacityConfig(headroom=0.0, warmup_floor=0.5),
        now=clock.now(),
    )
    rt.lifecycle.observe_health(Health.LOADING, clock.now())
    rt.lifecycle.observe_health(Health.OK, clock.now())
    rt.lifecycle.first_token(1.0, clock.now())
    rt.place(2 * GIB)
    rt.apply_signals(BackendSignals(at=clock.now(), running=4, waiting=6), clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(5 * GIB)  # once: just sent, maybe
    rt.place(GIB)
    clock.advance(0.2)
    rt.apply_signals(BackendSignals(at=clock.now(), running=8, waiting=3), clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(10 * GIB)  # draining: kept up
    rt.lifecycle.observe_health(Health.LOADING, clock.now())  # restarted: warming again
    rt.lifecycle.observe_health(Health.OK, clock.now())
    rt.lifecycle.ramp.allowance = 0.8
    clock.advance(1.0)
    rt.apply_signals(BackendSignals(at=clock.now(), running=8, waiting=3), clock.now())
    clock.advance(0.2)
    rt.apply_signals(BackendSignals(at=clock.now(), running=8, waiting=3), clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(5.6 * GIB)  # it stands: cut


def test_largest_free_block_bounds_a_request_and_leaves_capacity_whole() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0, shed_above=0.9))
    sig = BackendSignals(at=clock.now(), fragmentation=0.75, largest_free_block_bytes=GIB)
    rt.apply_signals(sig, clock.now())
    assert rt.view(clock.now()).usable == pytest.approx(10 * GIB)
    assert _score(rt, GIB, clock.now()) == pytest.approx(9 * GIB)
    assert _score(rt, GIB + 1, clock.now()) is None


def test_a_fragmentation_ratio_alone_makes_its_share_of_free_memory_unusable() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0, shed_above=0.9))
    rt.place(2 * GIB)
    rt.apply_signals(BackendSignals(at=clock.now(), fragmentation=0.25), clock.now())
    view = rt.view(clock.now())
    assert view.usable == pytest.approx(10 * GIB)
    assert view.free == pytest.approx((10 - 2) * GIB * 0.75)


def test_large_requests_avoid_a_backend_above_shed_above_small_ones_pass() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0, shed_above=0.5, large_request=0.1))
    rt.apply_signals(BackendSignals(at=clock.now(), fragmentation=0.6), clock.now())
    usable = rt.view(clock.now()).usable  # 4 GiB
    assert _score(rt, int(0.05 * usable), clock.now()) is not None
    assert _score(rt, int(0.2 * usable), clock.now()) is None


def test_usage_gauge_caps_free_and_counts_foreign_use() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0))
    rt.place(2 * GIB)  # ours, in flight at the scrape
    rt.apply_signals(BackendSignals(at=clock.now(), kv_usage=0.5), clock.now())
    # 5 GiB used of which 2 are ours: 3 GiB belong to someone else
    assert rt.view(clock.now()).free == pytest.approx(10 * GIB - 2 * GIB - 3 * GIB)
    rt.place(GIB)  # admitted after the scrape: the gauge does not show it yet
    assert rt.view(clock.now()).free == pytest.approx(4 * GIB)


def test_kv_freed_since_the_scrape_counts_at_once_reservations_placed_since_only_leave() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0))
    rt.overcommit.value = 2.0  # reservations are not the bound here; the gauge is
    rt.place(4 * GIB)  # ours, running at the scrape, holding 3 GiB of its 4 GiB reservation
    clock.advance(1.0)
    rt.apply_signals(BackendSignals(at=clock.now(), kv_usage=0.3), clock.now())
    rt.place(2 * GIB)  # admitted after the scrape
    assert rt.view(clock.now()).free == pytest.approx(10 * GIB - 3 * GIB - 2 * GIB)
    rt.unplace(2 * GIB, placed_at=clock.now(), held_bytes=GIB)  # gone before the gauge saw it
    assert rt.view(clock.now()).free == pytest.approx(7 * GIB)
    rt.finished(
        4 * GIB, failure=None, ttft_s=None, now=clock.now(), placed_at=0.0, held_bytes=3 * GIB
    )
    # the backend freed its 3 GiB when it ended; the gauge shows them only at the next scrape
    assert rt.view(clock.now()).free == pytest.approx(10 * GIB)


def test_an_ended_request_of_unknown_size_gives_nothing_back_before_the_next_scrape() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0))
    rt.overcommit.value = 2.0
    rt.place(4 * GIB)
    clock.advance(1.0)
    rt.apply_signals(BackendSignals(at=clock.now(), kv_usage=0.3), clock.now())
    rt.finished(4 * GIB, failure="timeout", ttft_s=None, now=clock.now(), placed_at=0.0)
    assert rt.view(clock.now()).free == pytest.approx(7 * GIB)


def test_usage_gauge_never_lets_free_exceed_what_it_shows() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.5))
    rt.apply_signals(BackendSignals(at=clock.now(), kv_usage=0.2), clock.now())
    v = rt.view(clock.now())
    assert v.free <= 10 * GIB * (1 - 0.2)


def test_stale_signals_are_ignored_and_own_accounting_decides() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0, stale_after_s=5.0))
    rt.apply_signals(BackendSignals(at=clock.now(), kv_usage=0.9), clock.now())
    assert rt.view(clock.now()).free == pytest.approx(GIB * 10 * 0.1)
    clock.advance(6.0)
    v = rt.view(clock.now())
    assert v.stale
    assert v.free == pytest.approx(10 * GIB)


def test_metrics_capacity_converts_tokens_to_bytes_and_is_remembered_when_stale() -> None:
    clock = FakeClock()
    rt = runtime(clock, kv_capacity_bytes=None, cap=CapacityConfig(headroom=0.0))
    assert rt.kind() is CapacityKind.CONCURRENCY
    rt.apply_signals(
        BackendSignals(at=clock.now(), capacity_tokens=1000, block_size=32), clock.now()
    )
    assert rt.kind() is CapacityKind.BYTES
    assert rt.total_bytes() == 1000 * KVT
    assert rt.block_size == 32
    clock.advance(60.0)
    assert rt.view(clock.now()).usable == pytest.approx(1000 * KVT)


def test_used_tokens_without_a_reported_pool_are_a_share_of_the_policy_capacity() -> None:
    # TGI reports the tokens its batch holds, and no longer the pool size.
    clock = FakeClock()
    rt = runtime(clock, kv_capacity_bytes=1000 * KVT, cap=CapacityConfig(headroom=0.0))
    rt.apply_signals(BackendSignals(at=clock.now(), used_tokens=400), clock.now())
    assert rt.view(clock.now()).free == pytest.approx(600 * KVT)


def test_policy_and_metrics_capacity_take_the_smaller() -> None:
    clock = FakeClock()
    rt = runtime(clock, kv_capacity_bytes=100 * KVT)
    rt.apply_signals(BackendSignals(at=clock.now(), capacity_tokens=1000), clock.now())
    assert rt.total_bytes() == 100 * KVT


def test_need_rounds_up_to_blocks() -> None:
    clock = FakeClock()
    rt = runtime(clock, block_size=16)
    assert rt.need_bytes(17, KVT) == 32 * KVT
    assert round_up_tokens(16, 16) == 16
    assert round_up_tokens(0, 16) == 0


def test_can_ever_hold_compares_with_full_warm_capacity() -> None:
    clock = FakeClock()
    rt = runtime(clock)  # 10 GiB, 10 % headroom
    assert rt.can_ever_hold(9 * GIB, 1)
    assert not rt.can_ever_hold(9 * GIB + 1, 1)


def test_preemption_rise_cuts_capacity_and_it_recovers() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0))
    rt.apply_signals(BackendSignals(at=clock.now(), preemptions_total=3), clock.now())
    clock.advance(1.0)
    rt.apply_signals(BackendSignals(at=clock.now(), preemptions_total=7), clock.now())
    cut = rt.view(clock.now()).usable
    assert cut == pytest.approx(8 * GIB)
    clock.advance(5.0)
    assert cut < rt.view(clock.now()).usable < 10 * GIB
    clock.advance(100.0)
    assert rt.view(clock.now()).usable == pytest.approx(10 * GIB)


def test_near_full_usage_with_growing_waiting_is_pressure() -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.0))
    rt.apply_signals(BackendSignals(at=clock.now(), kv_usage=0.97, waiting=1), clock.now())
    clock.advance(1.0)
    rt.apply_signals(BackendSignals(at=clock.now(), kv_usage=0.97, waiting=4), clock.now())
    assert rt.pressure.value(clock.now()) < 1.0


def test_oom_report_is_pressure_once_per_burst() -> None:
    p = Pressure(cut_factor=0.5, floor=0.1, recover_per_s=0.0, min_interval_s=1.0)
    p.cut(0.0)
    p.cut(0.5)
    assert p.value(0.5) == 0.5
    p.cut(1.0)
    assert p.value(1.0) == 0.25


@given(st.lists(st.floats(0.0, 10.0), max_size=30))
def test_pressure_stays_within_floor_and_one(gaps: list[float]) -> None:
    p = Pressure()
    now = 0.0
    for g in gaps:
        now += g
        p.cut(now)
        assert p.floor - 1e-12 <= p.value(now) <= 1.0


def test_slots_backend_counts_whole_slots_and_foreign_requests() -> None:
    clock = FakeClock()
    rt = runtime(clock, kv_capacity_bytes=None, signals=Signals.LLAMACPP)
    rt.apply_signals(BackendSignals(at=clock.now(), total_slots=4, running=1), clock.now())
    v = rt.view(clock.now())
    assert v.kind is CapacityKind.SLOTS
    assert v.free == 3  # one slot busy with someone else's request
    for _ in range(3):
        assert _score(rt, KVT, clock.now()) is not None
        rt.place(KVT)
    assert _score(rt, KVT, clock.now()) is None


def test_slot_context_bounds_prompt() -> None:
    clock = FakeClock()
    rt = runtime(clock, kv_capacity_bytes=None, memory=MemoryKind.SLOTS)
    rt.apply_signals(
        BackendSignals(at=clock.now(), total_slots=2, slot_ctx_tokens=4096), clock.now()
    )
    assert rt.can_ever_hold(10**12, 4096)
    assert not rt.can_ever_hold(1, 4097)


def test_no_memory_signal_uses_adaptive_concurrency_and_max_concurrency_caps() -> None:
    clock = FakeClock()
    rt = runtime(clock, kv_capacity_bytes=None, signals=Signals.NONE, max_concurrency=2)
    assert rt.kind() is CapacityKind.CONCURRENCY
    rt.place(0)
    rt.place(0)
    assert _score(rt, KVT, clock.now()) is None


@given(
    reserved=st.lists(st.integers(0, 4 * GIB), max_size=10),
    usage=st.none() | st.floats(0.0, 1.0),
    frag=st.none() | st.floats(0.0, 0.99),
)
def test_a_placed_request_never_exceeds_usable(
    reserved: list[int], usage: float | None, frag: float | None
) -> None:
    clock = FakeClock()
    rt = runtime(clock, cap=CapacityConfig(headroom=0.1, shed_above=1.0))
    rt.apply_signals(
        BackendSignals(at=clock.now(), kv_usage=usage, fragmentation=frag), clock.now()
    )
    for nbytes in reserved:
        if _score(rt, nbytes, clock.now()) is not None:
            rt.place(nbytes)
        assert rt.reserved_bytes <= rt.view(clock.now()).usable + 1e-6


def _score(rt: BackendRuntime, need_bytes: int, now: float) -> float | None:
    """Free bytes left after placing a request of ``need_bytes`` on ``rt``; None: no fit."""
    room = rt.room(now)
    return None if room is None else room.score(need_bytes)


def test_a_backend_with_a_queue_of_its_own_gets_no_more_than_it_runs() -> None:
    clock = FakeClock()
    rt = runtime(clock)
    for _ in range(30):
        rt.place(GIB // 100)
    # it runs 20 of our 30 and queues 10: memory is plentiful, compute is not
    rt.apply_signals(BackendSignals(at=clock.now(), running=20, waiting=10), clock.now())
    assert rt.room(clock.now()) is None
    for _ in range(9):
        rt.unplace(GIB // 100)  # 21 in flight: under 20 running + a tenth
    assert rt.room(clock.now()) is not None
    # its queue emptied: memory decides again
    for _ in range(20):
        rt.place(GIB // 100)
    rt.apply_signals(BackendSignals(at=clock.now(), running=40, waiting=0), clock.now())
    assert rt.room(clock.now()) is not None


def test_requests_of_others_in_its_queue_count_against_this_gateway() -> None:
    clock = FakeClock()
    rt = runtime(clock)
    for _ in range(5):
        rt.place(GIB // 100)
    # another gateway's 30 requests run or wait there beside our 5
    rt.apply_signals(BackendSignals(at=clock.now(), running=20, waiting=15), clock.now())
    assert rt.room(clock.now()) is None
    clock.advance(10.0)  # the scrape went stale: nothing is known of its queue any more
    assert rt.room(clock.now()) is not None


def test_an_oom_on_a_warming_backend_cuts_its_warm_up_as_well_as_its_pressure() -> None:
    clock = FakeClock()
    rt = BackendRuntime(
        BackendConfig(url="b", kv_capacity_bytes=10 * GIB, warmup_s=10.0),
        kv_bytes_per_token=KVT,
        cap=CapacityConfig(headroom=0.0, warmup_floor=0.1),
        now=clock.now(),
    )
    rt.lifecycle.observe_health(Health.LOADING, clock.now())
    rt.lifecycle.observe_health(Health.OK, clock.now())
    rt.lifecycle.ramp.allowance = 0.8
    rt.report_oom(clock.now())
    assert rt.lifecycle.capacity_factor(clock.now()) == pytest.approx(0.56)
    assert rt.view(clock.now()).usable == pytest.approx(10 * GIB * 0.56 * 0.8)
