"""The fair priority queue: order, fairness by weight, no head-of-line blocking, ageing,
depth, deadlines; CoDel and the drain-rate estimate."""

from __future__ import annotations

import itertools
import random
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.queueing import CoDel, DrainRate, Entry, FairQueue, QueueConfig
from gateway.core.types import Priority

_ids = itertools.count(1)


def entry(
    tenant: str = "a",
    *,
    cost: float = 1.0,
    priority: Priority = Priority.STANDARD,
    weight: float = 1.0,
    at: float = 0.0,
    deadline: float = 1e9,
    rank: float = 0.0,
) -> Entry:
    return Entry(next(_ids), tenant, priority, weight, cost, at, deadline, rank)


class Room:
    """A capacity in bytes: fits when the entry's cost is free."""

    def __init__(self, free: float) -> None:
        self.free = free

    def fits(self, e: Entry) -> bool:
        return e.cost <= self.free

    def place(self, e: Entry) -> None:
        self.free -= e.cost


def test_bands_are_served_in_priority_order_then_fifo() -> None:
    q = FairQueue(QueueConfig())
    low = entry(priority=Priority.SHEDDABLE)
    std1, std2 = entry(), entry()
    crit = entry(priority=Priority.CRITICAL)
    for e in (low, std1, std2, crit):
        assert q.push(e)
    room = Room(10)
    assert q.pump(room.fits, room.place, 0.0) == [crit, std1, std2, low]
    assert len(q) == 0


def test_no_head_of_line_blocking() -> None:
    q = FairQueue(QueueConfig())
    big, small = entry(cost=8), entry(cost=1)
    q.push(big)
    q.push(small)
    room = Room(4)
    assert q.pump(room.fits, room.place, 0.0) == [small]
    assert list(q) == [big]


def test_max_depth() -> None:
    q = FairQueue(QueueConfig(max_depth=2))
    assert q.push(entry())
    assert q.push(entry())
    assert not q.push(entry())
    assert len(q) == 2


def test_expired_and_remove() -> None:
    q = FairQueue(QueueConfig())
    a, b = entry(deadline=5.0), entry(deadline=10.0)
    q.push(a)
    q.push(b)
    assert q.next_deadline() == 5.0
    assert q.expired(5.0) == [a]
    assert q.remove(b.id) is b
    assert q.remove(b.id) is None
    assert len(q) == 0
    assert q.queued_bytes == 0


def fairness_run(
    weights: dict[str, float], services: int, seed: int, *, ranked: bool = False
) -> dict[str, float]:
    """Every tenant always backlogged; memory frees one request at a time. ``ranked``: each
    entry has a random density, so a tenant's turn takes its entries out of arrival order."""
    rng = random.Random(seed)
    q = FairQueue(QueueConfig(max_depth=10_000, age_bound_s=1e9))
    served = dict.fromkeys(weights, 0.0)
    capacity = 50.0
    room = Room(capacity)
    inflight: deque[Entry] = deque()
    now = 0.0

    def refill() -> None:
        for t, w in weights.items():
            while sum(1 for e in q if e.tenant == t) < 5:
                rank = rng.uniform(0, 100) if ranked else 0.0
                q.push(entry(t, cost=rng.uniform(1, 10), weight=w, at=now, rank=rank))

    def place(e: Entry) -> None:
        room.place(e)
        inflight.append(e)
        served[e.tenant] += e.cost

    refill()
    count = 0
    while count < services:
        count += len(q.pump(room.fits, place, now))
        done = inflight.popleft()
        room.free += done.cost
        now += 0.01
        refill()
    return served


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weights_two_to_one_share_kv_bytes_two_to_one(seed: int) -> None:
    served = fairness_run({"a": 2.0, "b": 1.0}, services=6000, seed=seed)
    assert served["a"] / served["b"] == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("seed", [1, 2])
def test_density_order_inside_a_tenant_keeps_the_weights(seed: int) -> None:
    """Measured 1.87-1.92 (FIFO on the same seeds: 1.93): a tenant gets no credit on a visit
    where nothing of it fits, and which of its entries wait depends on the order."""
    served = fairness_run({"a": 2.0, "b": 1.0}, services=6000, seed=seed, ranked=True)
    assert served["a"] / served["b"] == pytest.approx(2.0, rel=0.08)


def test_inside_a_tenant_the_densest_is_served_first_then_fifo() -> None:
    q = FairQueue(QueueConfig())
    sparse, dense1, dense2 = entry(rank=900), entry(rank=200), entry(rank=200)
    for e in (sparse, dense1, dense2):
        q.push(e)
    room = Room(2)
    assert q.pump(room.fits, room.place, 0.0) == [dense1, dense2]
    assert list(q) == [sparse]


def test_an_aged_sparse_entry_goes_before_younger_dense_ones() -> None:
    q = FairQueue(QueueConfig(age_bound_s=5.0))
    sparse = entry(cost=4, rank=900, at=0.0)
    q.push(sparse)
    dense = entry(cost=4, rank=100, at=4.0)
    q.push(dense)
    room = Room(4)
    assert q.pump(room.fits, room.place, 6.0) == [sparse]


@given(
    ranks=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 5)),
        min_size=1,
        max_size=30,
    )
)
def test_each_tenant_is_served_in_density_order(ranks: list[tuple[int, int]]) -> None:
    q = FairQueue(QueueConfig())
    for tenant, rank in ranks:
        q.push(entry(f"t{tenant}", rank=float(rank)))
    out = q.pump(Room(1e9).fits, Room(1e9).place, 0.0)
    assert len(out) == len(ranks)
    for tenant in {t for t, _ in ranks}:
        mine = [(e.rank, e.id) for e in out if e.tenant == f"t{tenant}"]
        assert mine == sorted(mine)


def test_bytes_ahead_of_a_density() -> None:
    q = FairQueue(QueueConfig())
    q.push(entry(cost=5, priority=Priority.CRITICAL, rank=900))
    q.push(entry(cost=3, rank=100))
    q.push(entry("b", cost=7, rank=500))
    q.push(entry(cost=11, priority=Priority.SHEDDABLE, rank=1))
    assert q.bytes_ahead(Priority.STANDARD) == 15
    assert q.bytes_ahead(Priority.STANDARD, rank=100) == 8
    assert q.bytes_ahead(Priority.STANDARD, rank=50) == 5


def test_equal_weights_share_equally_among_three() -> None:
    served = fairness_run({"a": 1.0, "b": 1.0, "c": 1.0}, services=6000, seed=7)
    total = sum(served.values())
    for share in served.values():
        assert share / total == pytest.approx(1 / 3, rel=0.05)


def test_aged_entry_stops_later_arrivals_from_passing_and_is_served_first() -> None:
    q = FairQueue(QueueConfig(age_bound_s=5.0))
    big = entry(cost=8, at=0.0)
    q.push(big)
    room = Room(4)
    q.push(entry(cost=1, at=1.0))
    assert len(q.pump(room.fits, room.place, 1.0)) == 1  # small passes while big is young
    q.push(entry(cost=1, at=6.0))
    assert q.pump(room.fits, room.place, 6.0) == []  # big aged: room is kept for it
    room.free = 8
    assert q.pump(room.fits, room.place, 6.5)[0] is big


def test_aged_entry_does_not_block_a_higher_band() -> None:
    q = FairQueue(QueueConfig(age_bound_s=5.0))
    q.push(entry(cost=8, at=0.0))
    crit = entry(cost=1, priority=Priority.CRITICAL, at=6.0)
    q.push(crit)
    room = Room(4)
    assert q.pump(room.fits, room.place, 6.0) == [crit]


def test_aged_entry_is_served_within_a_bound_under_a_stream_of_small_ones() -> None:
    q = FairQueue(QueueConfig(age_bound_s=2.0))
    big = entry(cost=30, at=0.0)
    q.push(big)
    room = Room(40)
    inflight: deque[tuple[float, Entry]] = deque()
    now = 0.0
    served_at = None

    def place(e: Entry) -> None:
        room.place(e)
        inflight.append((now + 1.0, e))  # each request holds its memory for 1 s

    while served_at is None:
        q.push(entry(cost=5, at=now))
        for e in q.pump(room.fits, place, now):
            if e is big:
                served_at = now
        while inflight and inflight[0][0] <= now:
            room.free += inflight.popleft()[1].cost
        now += 0.1
        assert now < 10.0
    assert served_at <= 2.0 + 1.0 + 0.2  # age bound + one hold time + one step


def test_codel_sheds_sheddable_then_standard_never_critical() -> None:
    c = CoDel(target_s=1.0, interval_s=0.1)
    c.observe(2.0, 0.0)
    assert c.level == 0
    c.observe(2.0, 0.1)
    assert c.sheds(Priority.SHEDDABLE)
    assert not c.sheds(Priority.STANDARD)
    c.observe(2.0, 0.2, may_escalate=False)  # sheddable entries still waiting to be shed
    assert c.level == 1
    c.observe(2.0, 0.3)
    assert c.sheds(Priority.STANDARD)
    assert not c.sheds(Priority.CRITICAL)
    c.observe(0.5, 0.4)
    assert c.level == 0


def test_drain_rate_and_hold_time() -> None:
    d = DrainRate(window_s=10.0)
    assert d.bytes_per_s(0.0) is None
    for i in range(10):
        d.record(100.0, 2.0, float(i))
    assert d.bytes_per_s(10.0) == pytest.approx(1000.0 / 10.0)
    assert d.hold_s == pytest.approx(2.0)
    assert d.bytes_per_s(100.0) is None


def test_a_drain_rate_is_settled_once_finishes_have_run_one_hold_time() -> None:
    d = DrainRate(window_s=10.0)
    assert not d.settled(0.0)
    d.record(100.0, 3.0, 20.0)  # the first finish after a load: it held its memory 3 s
    assert not d.settled(20.0)
    d.record(100.0, 3.0, 22.0)
    assert not d.settled(22.9)
    assert d.settled(23.0)  # what was placed after the first finish has had its time
    assert d.settled(31.9)
    assert not d.settled(32.1)  # 10 s without a finish: the window is empty again
    d.record(100.0, 3.0, 40.0)
    assert not d.settled(42.0)  # a new stretch starts its own count
    assert d.settled(43.0)


def test_reprice_moves_an_entry_within_its_tenant_and_keeps_the_totals() -> None:
    q = FairQueue(QueueConfig())
    sparse = entry("a", cost=10.0, rank=900.0)
    dense = entry("a", cost=4.0, rank=100.0)
    other = entry("b", cost=6.0, rank=500.0)
    for e in (sparse, dense, other):
        assert q.push(e)
    q.reprice(sparse, 2.0, 50.0)  # learned: far smaller than it was priced
    assert q.queued_bytes == pytest.approx(12.0)
    assert q.bytes_ahead(Priority.STANDARD, 100.0) == pytest.approx(6.0)
    assert q.bytes_ahead(Priority.STANDARD) == pytest.approx(12.0)
    room = Room(2.0)
    assert q.pump(room.fits, room.place, 0.0) == [sparse]  # now the densest of its tenant


@given(
    events=st.lists(st.tuples(st.floats(0.0, 1e9), st.floats(0.0, 4.0), st.booleans()), max_size=60)
)
def test_drain_rate_equals_the_sum_over_its_window(
    events: list[tuple[float, float, bool]],
) -> None:
    # The rate keeps a running total; it must match summing what is left in the window.
    d = DrainRate(window_s=10.0)
    now = 0.0
    kept: list[tuple[float, float]] = []
    for nbytes, gap, read in events:
        now += gap
        if read:
            kept = [(at, b) for at, b in kept if at >= now - 10.0]
            rate = d.bytes_per_s(now)
            if not kept:
                assert rate is None
            else:
                span = max(now - kept[0][0], 1.0)
                assert rate == pytest.approx(sum(b for _, b in kept) / span, rel=1e-9, abs=1e-6)
        else:
            d.record(nbytes, 1.0, now)
            kept.append((now, nbytes))


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "pump", "remove", "expire"]),
            st.integers(0, 3),
            st.floats(0.5, 20.0),
            st.sampled_from(list(Priority)),
        ),
        max_size=80,
    )
)
def test_every_entry_leaves_exactly_once_and_within_room(
    ops: list[tuple[str, int, float, Priority]],
) -> None:
    q = FairQueue(QueueConfig(max_depth=30, age_bound_s=3.0))
    live: dict[int, Entry] = {}
    gone: set[int] = set()
    now = 0.0
    for op, tenant, x, prio in ops:
        now += 0.5
        if op == "push":
            e = entry(
                f"t{tenant}", cost=x, priority=prio, weight=1 + tenant, at=now, deadline=now + x
            )
            if q.push(e):
                live[e.id] = e
        elif op == "pump":
            room = Room(x)
            out = q.pump(room.fits, room.place, now)
            assert sum(e.cost for e in out) <= x + 1e-9
            left = out
        elif op == "remove" and live:
            victim = sorted(live)[tenant % len(live)]
            left = [e for e in [q.remove(victim)] if e is not None]
        else:
            left = q.expired(now)
            assert all(e.deadline <= now for e in left)
        if op != "push":
            for e in left:
                assert e.id not in gone
                gone.add(e.id)
                del live[e.id]
        assert len(q) == len(live)
        assert q.queued_bytes == pytest.approx(sum(e.cost for e in live.values()))
