"""Admission decisions with a fake clock: routing, queueing, each shed reason and its
Retry-After, release, reload and the round-robin mode."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.admission import Admission, Placement, Queued, Rejection
from gateway.core.backend import BackendConfig, BackendSignals, MemoryKind
from gateway.core.capacity import CapacityConfig
from gateway.core.clock import FakeClock
from gateway.core.lifecycle import Health
from gateway.core.pool import AdmissionConfig, ModelPool, Ticket
from gateway.core.queueing import QueueConfig
from gateway.core.types import Outcome, Priority

KVT = 1024  # bytes per token, small numbers keep the arithmetic readable
M = "m"


def config(
    *backends: BackendConfig,
    queue: QueueConfig | None = None,
    cap: CapacityConfig | None = None,
    enabled: bool = True,
) -> AdmissionConfig:
    return AdmissionConfig(
        models=(ModelPool(M, KVT, backends),),
        enabled=enabled,
        capacity=cap or CapacityConfig(headroom=0.0),
        queue=queue or QueueConfig(),
    )


def backend(url: str, tokens: int = 1000, **kw: object) -> BackendConfig:
    kw.setdefault("memory", MemoryKind.CONTIGUOUS)  # worst-case reservations: exact arithmetic
    return BackendConfig(url=url, kv_capacity_bytes=tokens * KVT, block_size=1, **kw)  # type: ignore[arg-type]


def up(adm: Admission, clock: FakeClock, *urls: str) -> None:
    for url in urls:
        adm.observe_health(M, url, Health.OK, clock.now())


def ticket(
    clock: FakeClock,
    tokens: int = 100,
    *,
    tenant: str = "t",
    priority: Priority = Priority.STANDARD,
    timeout: float = 30.0,
    exclude: frozenset[str] = frozenset(),
) -> Ticket:
    return Ticket(
        tenant=tenant,
        model=M,
        priority=priority,
        weight=1.0,
        prompt_tokens=tokens // 2,
        max_output_tokens=tokens - tokens // 2,
        kv_bytes_per_token=KVT,
        deadline=clock.now() + timeout,
        exclude=exclude,
    )


def placed(v: object) -> Placement:
    assert isinstance(v, Placement), v
    return v


def rejected(v: object, outcome: Outcome) -> Rejection:
    assert isinstance(v, Rejection), v
    assert v.outcome is outcome, v
    return v


def test_routes_to_the_backend_with_most_free_bytes_after_placing() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000), backend("b", 2000)), clock.now())
    up(adm, clock, "a", "b")
    assert placed(adm.offer(ticket(clock, 500), clock.now())).backend_url == "b"
    assert placed(adm.offer(ticket(clock, 500), clock.now())).backend_url == "b"
    assert placed(adm.offer(ticket(clock, 500), clock.now())).backend_url == "a"


def test_never_routes_to_loading_ejected_or_excluded_backends() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a"), backend("b"), backend("c")), clock.now())
    up(adm, clock, "b", "c")
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    for _ in range(3):
        adm.observe_health(M, "b", Health.FAILED, clock.now())
    got = placed(adm.offer(ticket(clock, exclude=frozenset()), clock.now()))
    assert got.backend_url == "c"
    v = adm.offer(ticket(clock, exclude=frozenset({"c"})), clock.now())
    assert isinstance(v, Queued)


def test_queues_when_full_and_release_places_the_waiting_one() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    first = placed(adm.offer(ticket(clock, 800), clock.now()))
    assert first.reserved_bytes == 800 * KVT
    waiting = adm.offer(ticket(clock, 800), clock.now())
    assert isinstance(waiting, Queued)
    clock.advance(2.0)
    adm.release(first.lease_id, output_tokens=10, ttft_s=0.1, failure=None, now=clock.now())
    [(eid, second)] = adm.take_events()
    assert eid == waiting.entry_id
    assert placed(second).queued_s == pytest.approx(2.0)
    adm.release(first.lease_id, output_tokens=10, ttft_s=0.1, failure=None, now=clock.now())
    snap = adm.snapshot(clock.now())[M]
    assert isinstance(snap, dict)
    assert snap["backends"][0]["reserved_bytes"] == 800 * KVT  # idempotent release


def test_a_tenant_s_shorter_prompt_goes_first_when_memory_frees() -> None:
    # Same tenant, same output allowance: the shorter prompt holds less KV per token it makes,
    # so it passes an older, longer one (FIFO would place the 800 and leave the 600 waiting).
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    first = placed(adm.offer(ticket(clock, 900), clock.now()))
    base = ticket(clock)
    long_prompt = msgspec.structs.replace(base, prompt_tokens=500, max_output_tokens=300)
    short_prompt = msgspec.structs.replace(base, prompt_tokens=300, max_output_tokens=300)
    older = adm.offer(long_prompt, clock.now())
    younger = adm.offer(short_prompt, clock.now())
    assert isinstance(older, Queued)
    assert isinstance(younger, Queued)
    clock.advance(1.0)
    adm.release(first.lease_id, output_tokens=10, ttft_s=0.1, failure=None, now=clock.now())
    events = dict(adm.take_events())
    assert placed(events[younger.entry_id]).reserved_bytes == 600 * KVT
    assert older.entry_id not in events


def test_the_wait_predicted_at_arrival_counts_only_what_is_served_before_it() -> None:
    # Queued ahead: three sparse requests (800-token prompts). A dense arrival is served before
    # them, so its predicted wait is its own bytes; a sparse one waits behind all three.
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    warm = placed(adm.offer(ticket(clock, 900), clock.now()))
    clock.advance(1.0)
    adm.release(warm.lease_id, output_tokens=10, ttft_s=0.1, failure=None, now=clock.now())
    clock.advance(1.0)  # a hold time since the first finish: the drain rate is settled
    placed(adm.offer(ticket(clock, 1000), clock.now()))  # drain: 900 tokens of KV a second
    base = ticket(clock)
    sparse = msgspec.structs.replace(base, prompt_tokens=800, max_output_tokens=100)
    for _ in range(3):
        assert isinstance(adm.offer(sparse, clock.now()), Queued)
    soon = clock.now() + 1.0
    dense = msgspec.structs.replace(base, prompt_tokens=50, max_output_tokens=100, deadline=soon)
    assert isinstance(adm.offer(dense, clock.now()), Queued)
    late = msgspec.structs.replace(sparse, deadline=soon)
    shed = rejected(adm.offer(late, clock.now()), Outcome.SHED_DEADLINE)
    assert shed.retry_after_s == pytest.approx((3 * 900 + 150 + 900) / 900)


def test_a_release_places_the_smallest_waiting_request_that_now_fits() -> None:
    # A pump skips the queue when not even its smallest request fits; that index must follow
    # entries in and out.
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    a = placed(adm.offer(ticket(clock, 600, tenant="x"), clock.now()))
    b = placed(adm.offer(ticket(clock, 300, tenant="x"), clock.now()))
    large = adm.offer(ticket(clock, 500, tenant="y"), clock.now())
    small = adm.offer(ticket(clock, 150, tenant="z"), clock.now())
    assert isinstance(large, Queued)
    assert isinstance(small, Queued)
    adm.tick(clock.now())
    assert adm.take_events() == []
    adm.release(b.lease_id, output_tokens=1, ttft_s=0.1, failure=None, now=clock.now())
    assert [eid for eid, v in adm.take_events() if isinstance(v, Placement)] == [small.entry_id]
    adm.release(a.lease_id, output_tokens=1, ttft_s=0.1, failure=None, now=clock.now())
    assert [eid for eid, v in adm.take_events() if isinstance(v, Placement)] == [large.entry_id]


def test_too_large_for_any_backend_is_never_retried() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000), backend("b", 500)), clock.now())
    up(adm, clock, "a", "b")
    r = rejected(adm.offer(ticket(clock, 1001), clock.now()), Outcome.TOO_LARGE)
    assert not r.should_retry
    assert r.retry_after_s is None


def test_queue_full() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 100), queue=QueueConfig(max_depth=1)), clock.now())
    up(adm, clock, "a")
    placed(adm.offer(ticket(clock, 100), clock.now()))
    assert isinstance(adm.offer(ticket(clock, 100), clock.now()), Queued)
    r = rejected(adm.offer(ticket(clock, 100), clock.now()), Outcome.SHED_QUEUE_FULL)
    assert r.retry_after_s is not None
    assert r.retry_after_s >= 1.0


def drain_history(adm: Admission, clock: FakeClock, n: int, tokens: int, hold_s: float) -> None:
    """Run n requests through, each holding its memory hold_s: the drain rate is learned."""
    for _ in range(n):
        p = placed(adm.offer(ticket(clock, tokens), clock.now()))
        clock.advance(hold_s)
        adm.release(p.lease_id, output_tokens=1, ttft_s=0.1, failure=None, now=clock.now())


def test_deadline_that_cannot_be_met_is_shed_with_the_expected_wait() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    drain_history(adm, clock, 10, 1000, 1.0)  # 1000 tokens per second drain
    placed(adm.offer(ticket(clock, 1000), clock.now()))
    for _ in range(3):
        assert isinstance(adm.offer(ticket(clock, 1000), clock.now()), Queued)
    r = rejected(adm.offer(ticket(clock, 1000, timeout=2.0), clock.now()), Outcome.SHED_DEADLINE)
    # four queued requests ahead (this one included) drain at ~1000 tokens/s
    assert r.retry_after_s == pytest.approx(4.0, rel=0.15)
    assert isinstance(adm.offer(ticket(clock, 1000, timeout=10.0), clock.now()), Queued)


def test_deadline_passing_in_the_queue_is_shed() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 100)), clock.now())
    up(adm, clock, "a")
    placed(adm.offer(ticket(clock, 100), clock.now()))
    q = adm.offer(ticket(clock, 100, timeout=3.0), clock.now())
    assert isinstance(q, Queued)
    clock.advance(3.0)
    adm.tick(clock.now())
    [(eid, r)] = adm.take_events()
    assert eid == q.entry_id
    rejected(r, Outcome.SHED_DEADLINE)


def test_loading_past_the_deadline_is_shed_with_the_predicted_end() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000, warmup_s=0.0)), clock.now())
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    clock.advance(60.0)  # first load takes a minute: learned
    adm.observe_health(M, "a", Health.OK, clock.now())
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    clock.advance(10.0)
    r = rejected(adm.offer(ticket(clock, timeout=5.0), clock.now()), Outcome.SHED_LOADING)
    assert r.retry_after_s == pytest.approx(50.0)
    q = adm.offer(ticket(clock, timeout=120.0), clock.now())
    assert isinstance(q, Queued)  # will be up before its deadline: it waits
    clock.advance(50.0)
    adm.observe_health(M, "a", Health.OK, clock.now())
    [(eid, p)] = adm.take_events()
    assert eid == q.entry_id
    assert placed(p).backend_url == "a"


def test_a_first_load_is_predicted_from_the_policy() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", expected_load_s=20.0)), clock.now())
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    # a deadline before the predicted end of loading: refused at once, told when it ends
    shed = rejected(adm.offer(ticket(clock, timeout=5.0), clock.now()), Outcome.SHED_LOADING)
    assert shed.retry_after_s == pytest.approx(20.0)
    # one after it waits, and is served as soon as the backend is up
    q = adm.offer(ticket(clock, timeout=30.0), clock.now())
    assert isinstance(q, Queued)
    clock.advance(18.0)
    adm.tick(clock.now())
    assert adm.take_events() == []  # waiting for a loading backend is not shed
    adm.observe_health(M, "a", Health.OK, clock.now())
    [(eid, p)] = adm.take_events()
    assert eid == q.entry_id
    placed(p)


def test_a_load_running_past_the_deadline_sheds_with_the_predicted_rest() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", expected_load_s=20.0)), clock.now())
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    q = adm.offer(ticket(clock, timeout=25.0), clock.now())
    assert isinstance(q, Queued)
    clock.advance(25.0)  # overdue: predicted to need another quarter of 20 s
    adm.tick(clock.now())
    [(eid, r)] = adm.take_events()
    assert eid == q.entry_id
    assert rejected(r, Outcome.SHED_LOADING).retry_after_s == pytest.approx(5.0)


def test_large_request_shed_when_every_backend_is_fragmented_small_pass() -> None:
    clock = FakeClock()
    cap = CapacityConfig(headroom=0.0, shed_above=0.5, large_request=0.1)
    adm = Admission(config(backend("a", 1000), cap=cap), clock.now())
    up(adm, clock, "a")
    adm.observe_signals(M, "a", BackendSignals(at=clock.now(), fragmentation=0.6), clock.now())
    placed(adm.offer(ticket(clock, 20), clock.now()))  # 20 of 1000 usable: small
    rejected(adm.offer(ticket(clock, 150), clock.now()), Outcome.SHED_FRAGMENTATION)  # > 10%


def test_codel_sheds_sheddable_first_and_never_critical() -> None:
    clock = FakeClock()
    q = QueueConfig(target_delay_s=1.0, interval_s=0.5, max_wait_s=100.0)
    adm = Admission(config(backend("a", 100), queue=q), clock.now())
    up(adm, clock, "a")
    placed(adm.offer(ticket(clock, 100), clock.now()))
    low = adm.offer(ticket(clock, 100, priority=Priority.SHEDDABLE, timeout=100), clock.now())
    crit = adm.offer(ticket(clock, 100, priority=Priority.CRITICAL, timeout=100), clock.now())
    std = adm.offer(ticket(clock, 100, timeout=100), clock.now())
    assert isinstance(low, Queued)
    assert isinstance(crit, Queued)
    assert isinstance(std, Queued)
    shed: dict[int, Rejection] = {}
    for _ in range(10):
        clock.advance(0.5)
        adm.tick(clock.now())
        shed.update((eid, v) for eid, v in adm.take_events() if isinstance(v, Rejection))
    assert rejected(shed[low.entry_id], Outcome.SHED_OVERLOAD)
    assert rejected(shed[std.entry_id], Outcome.SHED_OVERLOAD)
    assert crit.entry_id not in shed
    r = adm.offer(ticket(clock, 10, priority=Priority.SHEDDABLE), clock.now())
    rejected(r, Outcome.SHED_OVERLOAD)


def test_errors_eject_and_traffic_moves() -> None:
    clock = FakeClock()
    cap = CapacityConfig(headroom=0.0, eject_failures=2, eject_cooldown_s=10.0)
    adm = Admission(config(backend("a", 2000), backend("b", 1000), cap=cap), clock.now())
    up(adm, clock, "a", "b")
    for _ in range(2):
        p = placed(adm.offer(ticket(clock), clock.now()))
        assert p.backend_url == "a"
        adm.release(p.lease_id, output_tokens=None, ttft_s=None, failure="5xx", now=clock.now())
    assert placed(adm.offer(ticket(clock), clock.now())).backend_url == "b"


def test_nothing_listening_takes_a_backend_out_until_it_answers_again() -> None:
    clock = FakeClock()
    a = backend("a", 2000, warmup_s=0.0)
    adm = Admission(config(a, backend("b", 1000)), clock.now())
    up(adm, clock, "a", "b")
    p = placed(adm.offer(ticket(clock), clock.now()))
    assert p.backend_url == "a"
    adm.release(p.lease_id, output_tokens=None, ttft_s=None, failure="connect", now=clock.now())
    assert placed(adm.offer(ticket(clock), clock.now())).backend_url == "b"  # one refusal
    adm.observe_health(M, "a", Health.OK, clock.now())  # back: up again, not ejected
    assert placed(adm.offer(ticket(clock), clock.now())).backend_url == "a"


def test_likely_reservation_uses_observed_outputs_on_paged_backends() -> None:
    clock = FakeClock()
    paged = BackendConfig(url="a", kv_capacity_bytes=10**9, block_size=16)
    adm = Admission(config(paged), clock.now())
    up(adm, clock, "a")
    t = Ticket("t", M, Priority.STANDARD, 1.0, 100, 1000, KVT, clock.now() + 30)
    first = placed(adm.offer(t, clock.now()))
    assert first.reserved_bytes == 1104 * KVT  # before samples: prompt + max_tokens, in blocks
    for _ in range(30):
        p = placed(adm.offer(t, clock.now()))
        adm.release(p.lease_id, output_tokens=50, ttft_s=0.1, failure=None, now=clock.now())
    assert placed(adm.offer(t, clock.now())).reserved_bytes == 160 * KVT


def test_cancel_removes_the_waiting_entry() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 100)), clock.now())
    up(adm, clock, "a")
    p = placed(adm.offer(ticket(clock, 100), clock.now()))
    q = adm.offer(ticket(clock, 100), clock.now())
    assert isinstance(q, Queued)
    assert adm.cancel(q.entry_id)
    assert not adm.cancel(q.entry_id)
    adm.release(p.lease_id, output_tokens=1, ttft_s=None, failure=None, now=clock.now())
    assert adm.take_events() == []


def test_reconfigure_keeps_state_of_persisting_urls_and_rejects_removed_models() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 100), backend("b", 100)), clock.now())
    up(adm, clock, "a", "b")
    p = placed(adm.offer(ticket(clock, 100), clock.now()))
    adm.reconfigure(config(backend(p.backend_url, 100)), clock.now())
    snap = adm.snapshot(clock.now())[M]
    assert isinstance(snap, dict)
    [b] = snap["backends"]
    assert b["reserved_bytes"] == 100 * KVT
    assert b["phase"] == "ready"
    q = adm.offer(ticket(clock, 100), clock.now())
    assert isinstance(q, Queued)
    adm.reconfigure(AdmissionConfig(models=()), clock.now())
    [(eid, r)] = adm.take_events()
    assert eid == q.entry_id
    assert rejected(r, Outcome.NOT_FOUND)
    adm.release(p.lease_id, output_tokens=1, ttft_s=None, failure=None, now=clock.now())


def test_disabled_admission_round_robins_over_serving_backends() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a"), backend("b"), backend("c"), enabled=False), clock.now())
    up(adm, clock, "a", "b")
    adm.observe_health(M, "c", Health.LOADING, clock.now())
    urls = [placed(adm.offer(ticket(clock, 10**6), clock.now())).backend_url for _ in range(4)]
    assert urls == ["a", "b", "a", "b"]


def test_unknown_model() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a")), clock.now())
    t = Ticket("t", "nope", Priority.STANDARD, 1.0, 1, 1, KVT, clock.now() + 1)
    rejected(adm.offer(t, clock.now()), Outcome.NOT_FOUND)


@settings(max_examples=60)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["offer", "release", "tick", "usage"]), st.integers(1, 600)),
        max_size=60,
    )
)
def test_reserved_bytes_never_exceed_usable_capacity(ops: list[tuple[str, int]]) -> None:
    clock = FakeClock()
    cap = CapacityConfig(headroom=0.1)
    adm = Admission(config(backend("a", 1000), backend("b", 700), cap=cap), clock.now())
    up(adm, clock, "a", "b")
    leases: list[int] = []
    for op, n in ops:
        if op == "offer":
            v = adm.offer(ticket(clock, n), clock.now())
            if isinstance(v, Placement):
                leases.append(v.lease_id)
        elif op == "release" and leases:
            lid = leases.pop(n % len(leases))
            adm.release(lid, output_tokens=1, ttft_s=0.1, failure=None, now=clock.now())
        elif op == "usage":
            sig = BackendSignals(at=clock.now(), kv_usage=n / 600)
            adm.observe_signals(M, "a", sig, clock.now())
        else:
            clock.advance(n / 100)
            adm.tick(clock.now())
        leases += [p.lease_id for _, p in adm.take_events() if isinstance(p, Placement)]
        snap = adm.snapshot(clock.now())[M]
        assert isinstance(snap, dict)
        for b in snap["backends"]:
            assert b["reserved_bytes"] <= b["usable"] + 1e-6


def test_one_free_region_is_never_promised_twice_on_a_contiguous_backend() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    region = 300 * KVT  # the largest free block: 300 tokens, although 1000 are free
    adm.observe_signals(
        M, "a", BackendSignals(at=clock.now(), largest_free_block_bytes=region), clock.now()
    )
    placed(adm.offer(ticket(clock, 200), clock.now()))
    # 200 of the 300 may already be carved out of that region: 150 more must wait
    assert isinstance(adm.offer(ticket(clock, 150), clock.now()), Queued)
    placed(adm.offer(ticket(clock, 100), clock.now()))


def test_requests_the_backend_may_not_have_allocated_at_a_scrape_still_count() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    first = placed(adm.offer(ticket(clock, 200), clock.now()))
    clock.advance(1.0)
    # The backend has a queue of its own, and `first` has not started: its region may still
    # be taken from the 300 the scrape reports free.
    sig = BackendSignals(at=clock.now(), waiting=1, largest_free_block_bytes=300 * KVT)
    adm.observe_signals(M, "a", sig, clock.now())
    assert isinstance(adm.offer(ticket(clock, 150), clock.now()), Queued)
    adm.started(first.lease_id)
    clock.advance(1.0)
    sig = BackendSignals(at=clock.now(), waiting=0, largest_free_block_bytes=300 * KVT)
    adm.observe_signals(M, "a", sig, clock.now())
    assert any(isinstance(v, Placement) for _, v in adm.take_events())


def _simulate_steady_overload(
    adm: Admission, clock: FakeClock, until: float, hold_s: float, probe_at: float
) -> tuple[Rejection, float]:
    """Two requests per second of 100 tokens on a backend of 1,000 (ten in flight, each
    held ``hold_s``), one tenant, deadlines far off: a queue that grows at one per second.
    At ``probe_at`` two more arrive together: one whose deadline is too close (its shed and
    Retry-After are returned) and one that waits; returns also how long that one waited."""
    t0 = clock.now()
    until += t0
    probe_at += t0
    releases: list[tuple[float, int]] = []
    probe: tuple[Rejection, int] | None = None
    probe_wait: float | None = None
    step = 0.1
    next_arrival = t0

    def admitted(eid: int | None, p: Placement) -> None:
        nonlocal probe_wait
        releases.append((clock.now() + hold_s, p.lease_id))
        if probe is not None and eid == probe[1]:
            probe_wait = clock.now() - probe_at

    while clock.now() < until and probe_wait is None:
        now = clock.now()
        for due, lease in [r for r in releases if r[0] <= now]:
            releases.remove((due, lease))
            adm.release(lease, output_tokens=50, ttft_s=0.1, failure=None, now=now)
        while next_arrival <= now:
            next_arrival += 0.5
            decision = adm.offer(ticket(clock, timeout=1000.0), now)
            if isinstance(decision, Placement):
                admitted(None, decision)
            else:
                assert isinstance(decision, Queued), decision
        if probe is None and now >= probe_at:
            shed = rejected(adm.offer(ticket(clock, timeout=5.0), now), Outcome.SHED_DEADLINE)
            queued = adm.offer(ticket(clock, timeout=1000.0), now)
            assert isinstance(queued, Queued)
            probe = (shed, queued.entry_id)
        adm.tick(now)
        for eid, verdict in adm.take_events():
            assert isinstance(verdict, Placement), verdict  # nobody here may be shed
            admitted(eid, verdict)
        clock.advance(step)
    assert probe is not None
    assert probe_wait is not None
    return probe[0], probe_wait


def test_a_request_shed_for_its_deadline_is_told_the_wait_it_would_have_had() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    shed, real_wait = _simulate_steady_overload(adm, clock, until=200.0, hold_s=10.0, probe_at=40.0)
    assert real_wait > 10.0  # a real queue, not a transient
    assert shed.retry_after_s == pytest.approx(real_wait, rel=0.2)


@settings(max_examples=40, deadline=None)
@given(
    load_s=st.floats(1.0, 120.0),
    expected_s=st.floats(1.0, 120.0),
    timeouts=st.lists(st.floats(0.5, 200.0), min_size=1, max_size=8),
)
def test_nobody_is_shed_while_a_loading_backend_is_predicted_up_within_its_deadline(
    load_s: float, expected_s: float, timeouts: list[float]
) -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 10_000, expected_load_s=expected_s)), clock.now())
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    outcome: dict[int, Placement | Rejection] = {}
    deadlines: dict[int, float] = {}
    for timeout in timeouts:
        decision = adm.offer(ticket(clock, timeout=timeout), clock.now())
        if isinstance(decision, Rejection):
            # refused at once only when the predicted end of loading is past its deadline
            assert rejected(decision, Outcome.SHED_LOADING).retry_after_s == pytest.approx(
                max(1.0, expected_s)
            )
            assert expected_s > timeout
        else:
            assert isinstance(decision, Queued)
            deadlines[decision.entry_id] = clock.now() + timeout
    load_s += clock.now()
    while clock.now() < load_s:
        clock.advance(min(0.5, load_s - clock.now()))
        adm.tick(clock.now())
        outcome.update(adm.take_events())
    adm.observe_health(M, "a", Health.OK, clock.now())
    outcome.update(adm.take_events())
    for eid, deadline in deadlines.items():
        result = outcome[eid]
        if isinstance(result, Rejection):
            # shed only once its deadline (or the predicted end of the load) was past it
            assert result.outcome is Outcome.SHED_LOADING
            assert deadline < load_s + 1e-9
        else:
            assert deadline >= load_s - 1e-9  # served when the backend came up


def test_auto_codel_sheds_only_the_sheddable_band_and_never_while_warming() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 100, warmup_s=0.0)), clock.now())
    up(adm, clock, "a")
    first = placed(adm.offer(ticket(clock, 100), clock.now()))
    clock.advance(2.0)
    adm.release(first.lease_id, output_tokens=50, ttft_s=0.1, failure=None, now=clock.now())
    # a request holds its memory about 2 s here: that is CoDel's target now
    placed(adm.offer(ticket(clock, 100), clock.now()))
    low = adm.offer(ticket(clock, 100, priority=Priority.SHEDDABLE, timeout=100), clock.now())
    std = adm.offer(ticket(clock, 100, timeout=100), clock.now())
    assert isinstance(low, Queued)
    assert isinstance(std, Queued)
    shed: dict[int, Rejection] = {}
    for _ in range(40):
        clock.advance(0.5)
        adm.tick(clock.now())
        shed.update((eid, v) for eid, v in adm.take_events() if isinstance(v, Rejection))
    assert rejected(shed[low.entry_id], Outcome.SHED_OVERLOAD)
    assert std.entry_id not in shed  # standard leaves the queue only by its deadline


def test_codel_sheds_nothing_while_a_backend_warms() -> None:
    clock = FakeClock()
    q = QueueConfig(target_delay_s=1.0, interval_s=0.5, max_wait_s=100.0)
    adm = Admission(config(backend("a", 1000, warmup_s=60.0), queue=q), clock.now())
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    clock.advance(1.0)
    adm.observe_health(M, "a", Health.OK, clock.now())  # warming: a tenth of 1,000 tokens
    placed(adm.offer(ticket(clock, 100), clock.now()))
    low = adm.offer(ticket(clock, 100, priority=Priority.SHEDDABLE, timeout=100), clock.now())
    assert isinstance(low, Queued)
    for _ in range(10):
        clock.advance(0.5)
        adm.tick(clock.now())
        assert not [v for _, v in adm.take_events() if isinstance(v, Rejection)]


def test_a_warming_backend_is_measured_by_a_first_token_before_any_request_ends() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000, warmup_s=60.0)), clock.now())
    adm.observe_health(M, "a", Health.LOADING, clock.now())
    clock.advance(10.0)
    adm.observe_health(M, "a", Health.OK, clock.now())  # warming: a tenth of 1,000 tokens
    first = placed(adm.offer(ticket(clock, 100), clock.now()))
    second = adm.offer(ticket(clock, 100), clock.now())
    assert isinstance(second, Queued)

    def scrape() -> None:
        clock.advance(0.2)
        sig = BackendSignals(at=clock.now(), running=1.0, waiting=0.0)
        adm.observe_signals(M, "a", sig, clock.now())

    scrape()  # kept up, but how fast it serves is not known yet: no growth
    assert adm.take_events() == []
    adm.first_token(first.lease_id)
    scrape()  # measured now: the allowance doubles while the first request still runs
    [(eid, verdict)] = adm.take_events()
    assert eid == second.entry_id
    placed(verdict)


def test_requests_queued_before_any_output_was_seen_are_repriced_when_it_is() -> None:
    clock = FakeClock()
    paged = BackendConfig(url="a", kv_capacity_bytes=2000 * KVT, block_size=16)
    adm = Admission(config(paged), clock.now())
    up(adm, clock, "a")
    big = Ticket("t", M, Priority.STANDARD, 1.0, 100, 1000, KVT, clock.now() + 300)
    placed(adm.offer(big, clock.now()))  # 1,104 tokens: max_tokens, nothing known yet
    waiting = adm.offer(big, clock.now())
    assert isinstance(waiting, Queued)  # needs 1,104 too, 896 are free
    small = Ticket("u", M, Priority.STANDARD, 1.0, 10, 10, KVT, clock.now() + 300)
    for _ in range(25):  # the model's outputs are learned: 50 tokens each
        offered = adm.offer(small, clock.now())
        lease = offered if isinstance(offered, Placement) else None
        for eid, verdict in adm.take_events():
            assert eid != waiting.entry_id
            lease = placed(verdict)
        assert lease is not None
        adm.release(lease.lease_id, output_tokens=50, ttft_s=0.1, failure=None, now=clock.now())
    assert [eid for eid, _ in adm.take_events()] == []
    clock.advance(1.0)
    adm.tick(clock.now())  # the review re-prices the queue: 100 + 50 tokens fit now
    [(eid, verdict)] = adm.take_events()
    assert eid == waiting.entry_id
    assert placed(verdict).reserved_bytes == 160 * KVT


def test_a_drain_rate_not_yet_settled_sheds_nobody_before_their_deadline() -> None:
    # The first finishes after a load say little of the rate to come: a request is then shed
    # by its deadline only, not by a wait predicted from them.
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    first = placed(adm.offer(ticket(clock, 1000), clock.now()))
    for _ in range(5):
        assert isinstance(adm.offer(ticket(clock, 1000, timeout=300.0), clock.now()), Queued)
    clock.advance(5.0)
    adm.release(first.lease_id, output_tokens=1, ttft_s=0.1, failure=None, now=clock.now())
    [(_, next_one)] = adm.take_events()
    placed(next_one)
    # four ahead at 1,000 tokens a second: 5 s predicted against a 3 s budget
    hopeful = adm.offer(ticket(clock, 1000, timeout=3.0), clock.now())
    assert isinstance(hopeful, Queued)
    clock.advance(1.0)
    adm.tick(clock.now())
    assert adm.take_events() == []
    clock.advance(2.0)
    adm.tick(clock.now())
    [(eid, verdict)] = adm.take_events()
    assert eid == hopeful.entry_id
    assert "not admitted within 3.0s" in rejected(verdict, Outcome.SHED_DEADLINE).message
    clock.advance(2.0)  # five seconds, one hold time, of finishes: settled
    r = rejected(adm.offer(ticket(clock, 1000, timeout=3.0), clock.now()), Outcome.SHED_DEADLINE)
    assert "exceeds the deadline" in r.message
