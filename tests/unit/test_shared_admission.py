"""Shared reservations, pure side: the ``LeaseBook`` semantics the Lua scripts are twins of, and
how admission plans with other replicas' bytes (or slots), a refused confirmation and a share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.admission import Admission, Placement, Queued
from gateway.core.backend import BackendSignals, MemoryKind
from gateway.core.clock import FakeClock
from gateway.core.shared import LeaseBook
from gateway.errors import PolicyError
from gateway.policy.compile import SharedAdmission, compile_policy
from gateway.policy.loader import load_text
from tests.unit.test_admission import KVT, M, backend, config, placed, ticket, up

LEASE = 5.0


def test_a_reservation_that_would_pass_the_limit_is_refused_and_not_recorded() -> None:
    book = LeaseBook()
    assert book.reserve("a", 1, 600, 1000, LEASE, 0.0) == (True, 0)
    assert book.reserve("b", 1, 500, 1000, LEASE, 0.0) == (False, 600)
    assert book.reserve("b", 2, 400, 1000, LEASE, 0.0) == (True, 600)
    assert book.total(0.0) == 1000


def test_a_dead_replica_frees_its_bytes_within_the_lease() -> None:
    book = LeaseBook()
    book.reserve("a", 1, 900, 1000, LEASE, 0.0)
    assert book.beat("b", 1, 0, LEASE, LEASE - 0.1) == 900
    assert book.beat("b", 2, 0, LEASE, LEASE) == 0  # a's heartbeat expired at LEASE
    assert book.reserve("b", 3, 1000, 1000, LEASE, LEASE) == (True, 0)


def test_an_older_write_never_overwrites_a_newer_one() -> None:
    book = LeaseBook()
    book.beat("a", 5, 300, LEASE, 0.0)
    book.beat("a", 4, 900, LEASE, 0.0)  # sent earlier, arrived later
    assert book.beat("b", 1, 0, LEASE, 0.0) == 300


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 600), st.floats(0, 3)),
        max_size=40,
    )
)
def test_replicas_that_grow_only_through_reserve_never_pass_the_limit(
    ops: list[tuple[str, int, float]],
) -> None:
    book = LeaseBook()
    now, limit = 0.0, 1000
    for seq, (replica, nbytes, dt) in enumerate(ops, 1):
        now += dt
        mine = book.held.get(replica, 0)
        if nbytes >= mine:
            book.reserve(replica, seq, nbytes, limit, LEASE, now)
        else:
            book.beat(replica, seq, nbytes, LEASE, now)  # a release
        assert book.total(now) <= limit


def test_a_waiting_replica_is_not_kept_below_its_weighted_share() -> None:
    book = LeaseBook()
    book.reserve("a", 1, 900, 1000, LEASE, 0.0)
    book.beat("b", 1, 0, LEASE, 0.0, want=1.0)  # b has a tenant of weight 1 waiting
    book.beat("a", 2, 400, LEASE, 0.0)  # a released 500: it may not take them all back
    # held to its half while b waits with less: the other half is not a's to plan on
    assert book.reserve("a", 3, 600, 1000, LEASE, 0.0) == (False, 500)
    assert book.reserve("a", 4, 500, 1000, LEASE, 0.0) == (True, 500)
    assert book.reserve("b", 2, 500, 1000, LEASE, 0.0) == (True, 500)
    # weights: a tenant of weight 2 at a holds up to two thirds while b waits with weight 1
    book.beat("b", 3, 200, LEASE, 0.0, want=1.0)
    book.beat("a", 5, 0, LEASE, 0.0)
    assert book.reserve("a", 6, 700, 1000, LEASE, 0.0, weight=2.0) == (False, 333)
    assert book.reserve("a", 7, 660, 1000, LEASE, 0.0, weight=2.0) == (True, 333)
    # nobody waits below its share: the rest of the memory is not held back (work-conserving)
    book.beat("b", 4, 340, LEASE, 0.0, want=1.0)
    assert book.reserve("a", 8, 660, 1000, LEASE, 0.0, weight=2.0) == (True, 340)


def test_other_replicas_bytes_are_not_planned() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    adm.observe_foreign("a", 700 * KVT, clock.now())
    assert isinstance(adm.offer(ticket(clock, 400), clock.now()), Queued)
    adm.observe_foreign("a", 500 * KVT, clock.now())  # another replica released
    [(_, verdict)] = adm.take_events()
    assert placed(verdict).reserved_bytes == 400 * KVT
    assert adm.held("a") == 400 * KVT
    assert adm.ceiling(M, "a", clock.now()) == 1000 * KVT


def test_a_refused_confirmation_frees_the_placement_and_gives_the_ticket_back() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    t = ticket(clock, 400)
    first = placed(adm.offer(t, clock.now()))
    assert adm.refused(first.lease_id, clock.now()) == t
    assert adm.held("a") == 0
    assert adm.refused(first.lease_id, clock.now()) is None  # once
    adm.observe_foreign("a", 700 * KVT, clock.now())
    assert isinstance(adm.offer(t, clock.now()), Queued)


def test_a_share_plans_that_part_of_every_backend_and_forgets_foreign_bytes() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("a", 1000)), clock.now())
    up(adm, clock, "a")
    adm.observe_foreign("a", 900 * KVT, clock.now())
    adm.set_share(1 / 3, clock.now())
    assert placed(adm.offer(ticket(clock, 300), clock.now())).backend_url == "a"
    assert isinstance(adm.offer(ticket(clock, 100), clock.now()), Queued)
    adm.set_share(1.0, clock.now())
    [(_, verdict)] = adm.take_events()
    placed(verdict)


POLICY = """
version: 1
store: {STORE}
models:
  m:
    kv: {layers: 2, kv_heads: 2, head_dim: 64}
    backends: [{url: "http://gpu:8000"}]
admission:
  shared: {lease: 3s, refresh: 100ms}
"""


def test_the_shared_key_resolves_against_a_redis_store() -> None:
    store = "{kind: redis, url: 'redis://r:6379/2', prefix: p, replicas: 3}"
    shared = compile_policy(load_text(POLICY.replace("{STORE}", store))).shared
    assert shared == SharedAdmission("redis://r:6379/2", "p", 3, 3.0, 0.1, 0.2)


def test_the_shared_key_without_redis_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match=r"admission.shared: .* needs `store: \{kind: redis\}`"):
        compile_policy(load_text(POLICY.replace("{STORE}", "{kind: memory}")))


def _slot_backend(adm: Admission, clock: FakeClock, slots: int) -> None:
    up(adm, clock, "s")
    adm.observe_signals(M, "s", BackendSignals(at=clock.now(), total_slots=slots), clock.now())


def test_a_slot_backend_is_shared_in_slots() -> None:
    clock = FakeClock()
    adm = Admission(config(backend("s", memory=MemoryKind.SLOTS)), clock.now())
    _slot_backend(adm, clock, 4)
    assert adm.ceiling(M, "s", clock.now()) == 4
    placed(adm.offer(ticket(clock), clock.now()))
    assert adm.held("s") == 1  # one slot, whatever its bytes
    adm.observe_foreign("s", 3, clock.now())  # other replicas hold the other three
    assert isinstance(adm.offer(ticket(clock), clock.now()), Queued)
    adm.observe_foreign("s", 2, clock.now())
    [(_, verdict)] = adm.take_events()
    placed(verdict)
    assert adm.held("s") == 2


@given(
    st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.floats(0, 1)), max_size=60),
)
def test_replicas_confirming_slots_in_one_book_never_hold_more_than_the_slots(
    ops: list[tuple[int, bool, float]],
) -> None:
    """Three replicas' cores, each placement (at once or from the queue) confirmed in one book
    as the admitter does (a refused one freed again), each release published: never more
    requests confirmed than there are slots."""
    clock = FakeClock()
    book = LeaseBook()
    cores = [Admission(config(backend("s", memory=MemoryKind.SLOTS)), clock.now()) for _ in "abc"]
    for adm in cores:
        _slot_backend(adm, clock, 3)
    leases: list[list[int]] = [[], [], []]
    seqs = iter(range(1, 10**6))

    def confirm(replica: int, placement: Placement) -> None:
        adm = cores[replica]
        limit = adm.ceiling(M, "s", clock.now())
        assert limit is not None
        held = adm.held("s")
        ok, foreign = book.reserve("abc"[replica], next(seqs), held, limit, LEASE, clock.now())
        adm.observe_foreign("s", foreign, clock.now())  # first, as the admitter does
        if ok:
            leases[replica].append(placement.lease_id)
        else:
            adm.refused(placement.lease_id, clock.now())

    for replica, arrive, dt in ops:
        clock.advance(dt)
        adm = cores[replica]
        if arrive:
            verdict = adm.offer(ticket(clock, timeout=1e9), clock.now())
            if isinstance(verdict, Placement):
                confirm(replica, verdict)
        elif leases[replica]:
            lease = leases[replica].pop(0)
            adm.release(lease, output_tokens=None, ttft_s=None, failure=None, now=clock.now())
            held = adm.held("s")
            foreign = book.beat("abc"[replica], next(seqs), held, LEASE, clock.now())
            adm.observe_foreign("s", foreign, clock.now())
        for r, core in enumerate(cores):
            for _, queued in core.take_events():
                if isinstance(queued, Placement):
                    confirm(r, queued)
            # every replica's heartbeat (each refresh) keeps its figure alive
            foreign = book.beat("abc"[r], next(seqs), core.held("s"), LEASE, clock.now())
            core.observe_foreign("s", foreign, clock.now())
        # what is forwarded: a heartbeat may publish a placement still being confirmed, which
        # only holds the others back
        assert sum(map(len, leases)) <= 3


def test_a_replica_places_nothing_in_a_band_worse_than_one_waiting_elsewhere() -> None:
    book = LeaseBook()
    book.reserve("a", 1, 400, 1000, LEASE, 0.0, band=2)
    book.beat("b", 1, 500, LEASE, 0.0, want=1.0, limit=1000, band=0)  # b: critical waiting
    # 100 are free, but a's sheddable requests may not take them (nor what a's own frees
    # before it publishes its lower figure); its critical ones may
    assert book.reserve("a", 2, 500, 1000, LEASE, 0.0, band=2) == (False, 1000)
    assert book.reserve("a", 3, 400, 1000, LEASE, 0.0, band=2) == (False, 1000)
    assert book.reserve("a", 4, 500, 1000, LEASE, 0.0, band=0) == (True, 500)
    assert book.reserve("a", 5, 500, 1000, LEASE, 0.0, band=1) == (False, 1000)
    book.beat("b", 2, 500, LEASE, 0.0, want=0.0, band=None)  # b's queue emptied
    assert book.reserve("a", 6, 500, 1000, LEASE, 0.0, band=2) == (True, 500)
