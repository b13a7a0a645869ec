"""Admission decisions: place a request on a backend of its model, queue it, or shed it. Pure.

``Admission`` is a synchronous state machine driven by ``gateway.backends.admitter``; every
call takes ``now``. Calls that change capacity (``offer``, ``release``, probes, ``tick``) pump
the queue, and what the pump decides for *other* waiting requests is collected in an outbox the
driver empties with ``take_events`` (entry id → ``Placement`` or ``Rejection``).

Routing: among the model's warming/ready backends (never loading or ejected ones, nor those in
``Ticket.exclude``), the request goes where it fits with the most free usable bytes left after
placing it (``Room.score``).

Shed reasons, each a ``Rejection`` whose ``retry_after_s`` is an estimate, not a guess:
- ``TOO_LARGE``: no backend could hold it even idle (``should_retry`` False);
- ``SHED_QUEUE_FULL``: the queue is at ``max_depth``;
- ``SHED_OVERLOAD``: CoDel says queue delay stays above target (sheddable, then standard);
- ``SHED_LOADING``: every backend is loading and the predicted end of loading is past the
  deadline (Retry-After = that predicted end);
- ``SHED_FRAGMENTATION``: a large request while every serving backend is fragmented above
  ``shed_above`` (Retry-After = typical time a request holds its memory);
- ``SHED_DEADLINE``: the wait expected from the drain rate exceeds the deadline, or the deadline
  passed in the queue.
Wait estimate: (bytes queued ahead: in better bands, and in the same band by requests at least
as dense, this request included; minus bytes free now) / bytes finished per second over the
last 10 s.

With ``enabled=False`` there is no queue and no memory accounting: round robin over serving
backends.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import msgspec

from gateway.core.backend import (
    BackendConfig,
    BackendRuntime,
    BackendSignals,
    Failure,
    ReserveMode,
)
from gateway.core.capacity import Room
from gateway.core.lifecycle import Health
from gateway.core.outputs import OutputLengths
from gateway.core.pool import AdmissionConfig, Pool, Ticket, Waiting
from gateway.core.queueing import Entry
from gateway.core.types import Outcome, Priority

# Members read on every request, bound once: on Python 3.11 a read off the class goes through
# the enum metaclass's ``__getattr__`` hook (about 140 ns a read; 3.12 dropped it).
_LIKELY = ReserveMode.LIKELY
_SHEDDABLE = Priority.SHEDDABLE
_STANDARD = Priority.STANDARD

_MIN_RETRY_S = 1.0
# How often the queue's predicted starts are checked against their deadlines (a scan of it).
_REVIEW_S = 1.0
# A backend with no queue of its own allocates a request within a step of receiving it.
_ALLOCATION_GRACE_S = 0.1


class Placement(msgspec.Struct, frozen=True, gc=False):
    lease_id: int
    model: str
    backend_url: str
    reserved_bytes: int
    queued_s: float


class Rejection(msgspec.Struct, frozen=True, gc=False):
    outcome: Outcome
    retry_after_s: float | None
    message: str
    should_retry: bool = True


class Queued(msgspec.Struct, frozen=True, gc=False):
    entry_id: int


Decision = Placement | Rejection | Queued
"""What ``Admission.offer`` answers."""


@dataclass(slots=True)
class _Lease:
    model: str
    url: str
    tenant: str
    nbytes: int
    placed_at: float
    ticket: Ticket
    started: bool = False


class Admission:
    """Admission state for every model of the policy. Not thread-safe; one event loop owns it."""

    def __init__(self, config: AdmissionConfig, now: float) -> None:
        self.config = config
        self.outputs = OutputLengths(quantile=config.output_quantile)
        self._pools = {m.name: Pool(m, config, now) for m in config.models}
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(1)
        self._events: list[tuple[int, Placement | Rejection]] = []
        self._chosen: dict[int, tuple[str, int]] = {}
        self._share = 1.0

    # -- requests -----------------------------------------------------------------------------

    def offer(self, ticket: Ticket, now: float) -> Decision:
        pool = self._pools.get(ticket.model)
        if pool is None:
            return Rejection(Outcome.NOT_FOUND, None, f"unknown model {ticket.model!r}", False)
        cands = pool.candidates(ticket)
        if not cands:
            return Rejection(Outcome.UPSTREAM_ERROR, _MIN_RETRY_S, "every backend failed")
        if not self.config.enabled:
            return self._round_robin(pool, cands, ticket, now)
        needs = self._needs(cands, ticket)
        if not any(
            b.can_ever_hold(need, ticket.prompt_tokens)
            for b, (_, need) in zip(cands, needs, strict=False)
        ):
            return Rejection(
                Outcome.TOO_LARGE,
                None,
                "request needs more KV memory than any backend of the model has",
                False,
            )
        cached = _cached(cands, ticket)
        rank = _density(ticket, self.outputs, cached)
        if pool.codel.sheds(ticket.priority) and pool.all_ready(now):
            # Refuse at the door only while the queue ahead of it (what its band would serve
            # before a request this dense) already holds a target delay of work: an emptied
            # queue would leave memory idle the moment it frees.
            retry = self._wait_estimate(pool, ticket.priority, 0.0, now, rank=rank)
            if retry is None or retry >= pool.codel.target_s:
                return Rejection(Outcome.SHED_OVERLOAD, _retry(retry), "queue delay above target")
        if not len(pool.queue):
            # Nobody waits, so nobody can be passed: place at once if it fits anywhere.
            best = self._best(needs, {b.url: b.room(now) for b in cands})
            if best is not None:
                pool.codel.observe(0.0, now)
                return self._place(pool, pool.backends[best[0]], ticket, best[1], 0.0, now)
        entry = Entry(
            id=next(self._ids),
            tenant=ticket.tenant,
            priority=ticket.priority,
            weight=ticket.weight,
            cost=float(_tokens_cost(ticket, self.outputs, cached)),
            enqueued_at=now,
            deadline=ticket.deadline,
            rank=rank,
        )
        if not pool.queue.push(entry):
            retry = self._wait_estimate(pool, ticket.priority, entry.cost, now)
            return Rejection(Outcome.SHED_QUEUE_FULL, _retry(retry), "admission queue is full")
        pool.wait(entry.id, Waiting(ticket, needs))
        self._pump_pool(pool, now)
        for i, (eid, verdict) in enumerate(self._events):
            if eid == entry.id:
                del self._events[i]
                return verdict
        rejection = self._reject_on_arrival(pool, ticket, cands, rank, now)
        if rejection is not None:
            self._drop(pool, entry.id)
            return rejection
        return Queued(entry.id)

    def cancel(self, entry_id: int) -> bool:
        """Forget a waiting entry (its client left). True if it was still queued."""
        return any(self._drop(pool, entry_id) for pool in self._pools.values())

    def started(self, lease_id: int) -> None:
        """The backend began answering a placement (its response headers arrived)."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.started = True

    def caches_prefixes(self, model: str) -> bool:
        """Some backend of ``model`` says it reuses cached prompt prefixes: its tickets should
        carry their prompt's chunk hashes."""
        pool = self._pools.get(model)
        return pool is not None and any(rt.prefixes is not None for rt in pool.backends.values())

    def first_token(self, lease_id: int) -> None:
        """A placement's first token reached its client (a stream's first event): its backend
        is answering (``WarmupRamp.answering``)."""
        lease = self._leases.get(lease_id)
        rt = None if lease is None else self._runtime(lease.model, lease.url)
        if rt is not None:
            rt.answering()

    def release(
        self,
        lease_id: int,
        *,
        output_tokens: int | None,
        ttft_s: float | None,
        failure: Failure | None,
        now: float,
    ) -> None:
        """Free a placement and learn from how it went (``BackendRuntime.finished``); a success
        teaches the output length. Unknown ids are ignored (idempotent)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        pool = self._pools.get(lease.model)
        rt = None if pool is None else pool.backends.get(lease.url)
        if pool is None or rt is None:
            return
        pool.drain.record(lease.nbytes, now - lease.placed_at, now)
        held = 0
        if failure is None and output_tokens is not None:
            held = rt.need_bytes(
                lease.ticket.prompt_tokens + output_tokens, lease.ticket.kv_bytes_per_token
            )
        rt.finished(
            lease.nbytes,
            failure=failure,
            ttft_s=ttft_s,
            now=now,
            placed_at=lease.placed_at,
            held_bytes=held,
        )
        if failure is None and output_tokens is not None:
            self.outputs.observe(lease.model, lease.tenant, output_tokens)
        self._pump_pool(pool, now)

    def refused(self, lease_id: int, now: float) -> Ticket | None:
        """The shared store refused to confirm a placement (other replicas filled the backend
        first): free it without learning anything and answer its ticket, to offer again."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        pool = self._pools.get(lease.model)
        rt = None if pool is None else pool.backends.get(lease.url)
        if pool is not None and rt is not None:
            rt.unplace(lease.nbytes, placed_at=lease.placed_at)
            self._pump_pool(pool, now)
        return lease.ticket

    def lease_url(self, lease_id: int) -> str | None:
        lease = self._leases.get(lease_id)
        return None if lease is None else lease.url

    def held(self, url: str) -> int:
        """What this process holds (or is confirming) on the backend at ``url``, in the unit
        its ``ceiling`` counts (bytes, or slots)."""
        return sum(
            rt.shared_held() for pool in self._pools.values() if (rt := pool.backends.get(url))
        )

    def waiting_weight(self, url: str) -> float:
        """The summed weights of the tenants queued for a model the backend at ``url`` serves
        (each tenant once): this replica's demand there, for fairness across replicas."""
        weights: dict[str, float] = {}
        for pool in self._pools.values():
            if url in pool.backends:
                for e in pool.queue:
                    weights[e.tenant] = e.weight
        return sum(weights.values())

    def waiting_band(self, url: str) -> int | None:
        """The best band queued for a model the backend at ``url`` serves (None: nothing
        waits), for priority across replicas."""
        bands = [
            e.priority for pool in self._pools.values() if url in pool.backends for e in pool.queue
        ]
        return int(min(bands)) if bands else None

    def url_ceiling(self, url: str, now: float) -> float | None:
        """``ceiling`` of the backend at ``url`` (the first model's that has it)."""
        for pool in self._pools.values():
            rt = pool.backends.get(url)
            if rt is not None:
                return rt.ceiling(now)
        return None

    def ceiling(self, model: str, url: str, now: float) -> float | None:
        """``BackendRuntime.ceiling`` of one backend; None if unknown or not shared."""
        rt = self._runtime(model, url)
        return None if rt is None else rt.ceiling(now)

    def observe_foreign(self, url: str, nbytes: int, now: float) -> None:
        """Other replicas hold ``nbytes`` on the backend at ``url`` (the shared store says;
        slots on a slot backend)."""
        for pool in self._pools.values():
            rt = pool.backends.get(url)
            if rt is not None and rt.observe_foreign(nbytes):
                self._pump_pool(pool, now)

    def set_share(self, share: float, now: float) -> None:
        """Plan ``share`` of every backend (1/replicas while the shared store is lost); a
        share below 1 forgets the foreign figures, which it stands in for."""
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self._share = share
        for pool in self._pools.values():
            for rt in pool.backends.values():
                rt.share = share
                if share < 1:
                    rt.observe_foreign(0)
            self._pump_pool(pool, now)

    # -- backend observations -----------------------------------------------------------------

    def observe_health(self, model: str, url: str, health: Health, now: float) -> None:
        rt = self._runtime(model, url)
        if rt is not None:
            rt.observe_health(health, now)
            self._pump_pool(self._pools[model], now)

    def observe_signals(self, model: str, url: str, signals: BackendSignals, now: float) -> None:
        rt = self._runtime(model, url)
        if rt is not None:
            rt.apply_signals(signals, now, pending_bytes=self._pending(model, url, signals, now))
            self._pump_pool(self._pools[model], now)

    def _pending(self, model: str, url: str, signals: BackendSignals, now: float) -> int:
        """Bytes placed on a backend that its scrape may not show allocated: every unanswered
        request while the backend has a queue of its own, else those placed just before."""
        recent = now - _ALLOCATION_GRACE_S
        queued = bool(signals.waiting)
        return sum(
            lease.nbytes
            for lease in self._leases.values()
            if lease.url == url
            and lease.model == model
            and not lease.started
            and (queued or lease.placed_at >= recent)
        )

    def tick(self, now: float) -> None:
        """Time passed: expire deadlines, shed what can no longer start in time, apply CoDel,
        re-try the queue."""
        for pool in self._pools.values():
            if len(pool.queue) and now >= pool.review_at:
                pool.review_at = now + _REVIEW_S
                self._review(pool, now)
            self._pump_pool(pool, now)

    def any_serving(self, now: float) -> bool:
        """Some backend of some model is warming or ready (the gateway's readiness)."""
        return any(
            rt.capacity_factor(now) > 0
            for pool in self._pools.values()
            for rt in pool.backends.values()
        )

    def backends(self) -> list[tuple[str, BackendConfig]]:
        """(model, backend config) of every configured backend, for the monitors."""
        return [
            (name, rt.config) for name, pool in self._pools.items() for rt in pool.backends.values()
        ]

    def take_events(self) -> list[tuple[int, Placement | Rejection]]:
        events, self._events = self._events, []
        return events

    def next_wakeup(self, now: float) -> float | None:
        """Earliest moment time alone may change a decision (deadline, ageing, ramp, CoDel)."""
        times: list[float] = []
        for pool in self._pools.values():
            if not len(pool.queue):
                continue
            times.append(now + 0.5)  # pressure recovery and signal staleness are continuous
            deadline = pool.queue.next_deadline()
            if deadline is not None:
                times.append(deadline)
            check = pool.codel.next_check_at()
            if check is not None:
                times.append(check)
            times.append(max(pool.review_at, now))
            oldest = pool.queue.oldest()
            if oldest is not None:
                q = pool.queue.config
                for later in (
                    oldest.enqueued_at + pool.codel.target_s,
                    oldest.enqueued_at + q.ageing_s,
                ):
                    if later < float("inf"):
                        times.append(later if later > now else now + q.interval_s)
            for rt in pool.backends.values():
                change = rt.next_change_at(now)
                if change is not None:
                    times.append(change)
        return min(times, default=None)

    # -- policy -------------------------------------------------------------------------------

    def reconfigure(self, config: AdmissionConfig, now: float) -> None:
        """Hot reload. Pools and backends that persist keep their state, queue and leases;
        entries queued for a model that disappeared are rejected through the outbox."""
        self.config = config
        self.outputs.quantile = config.output_quantile
        pools: dict[str, Pool] = {}
        for spec in config.models:
            pool = self._pools.pop(spec.name, None)
            if pool is None:
                pool = Pool(spec, config, now)
            else:
                pool.retune(spec, config, now)
                self._reprice(pool, force=True)  # backends may have come or gone
            pools[spec.name] = pool
        for gone in self._pools.values():
            for entry_id in list(gone.waiting):
                self._drop(gone, entry_id)
                msg = "model removed from the policy"
                self._events.append((entry_id, Rejection(Outcome.NOT_FOUND, None, msg, False)))
        self._pools = pools
        for pool in pools.values():
            for rt in pool.backends.values():
                rt.share = self._share
            self._pump_pool(pool, now)

    def snapshot(self, now: float) -> dict[str, object]:
        """Plain data for the admin view and metrics."""
        out: dict[str, object] = {}
        for name, pool in self._pools.items():
            backends = [rt.describe(now) for rt in pool.backends.values()]
            out[name] = {
                "backends": backends,
                "queue_depth": len(pool.queue),
                "queued_bytes": pool.queue.queued_bytes,
                "oldest_wait_s": pool.queue.oldest_age(now),
                "codel_level": pool.codel.level,
                "drain_bytes_per_s": pool.drain.bytes_per_s(now),
                # what a request of the last band arriving now would wait (None: unknown)
                "predicted_wait_s": self._start_in(
                    pool, list(pool.backends.values()), Priority.SHEDDABLE, 0.0, now
                ),
            }
        return out

    # -- internals ----------------------------------------------------------------------------

    def _runtime(self, model: str, url: str) -> BackendRuntime | None:
        pool = self._pools.get(model)
        return None if pool is None else pool.backends.get(url)

    def _need(self, rt: BackendRuntime, ticket: Ticket) -> int:
        return rt.need_bytes(_tokens(rt, ticket, self.outputs), ticket.kv_bytes_per_token)

    def _round_robin(
        self, pool: Pool, cands: list[BackendRuntime], ticket: Ticket, now: float
    ) -> Decision:
        serving = [b for b in cands if b.serving(now)]
        if not serving:
            wait = min(b.predicted_ready_at(now) for b in cands) - now
            return Rejection(Outcome.SHED_LOADING, _retry(wait), "no backend is serving")
        rt = serving[pool.rr % len(serving)]
        pool.rr += 1
        return self._place(pool, rt, ticket, 0, 0.0, now)

    def _place(
        self,
        pool: Pool,
        rt: BackendRuntime,
        ticket: Ticket,
        nbytes: int,
        queued_s: float,
        now: float,
    ) -> Placement:
        lease_id = next(self._ids)
        rt.place(nbytes)
        if ticket.prefix:
            rt.remember(ticket)
        self._leases[lease_id] = _Lease(pool.spec.name, rt.url, ticket.tenant, nbytes, now, ticket)
        return Placement(lease_id, pool.spec.name, rt.url, nbytes, queued_s)

    def _needs(self, cands: list[BackendRuntime], ticket: Ticket) -> tuple[tuple[str, int], ...]:
        return tuple((rt.url, self._need(rt, ticket)) for rt in cands)

    @staticmethod
    def _best(
        needs: tuple[tuple[str, int], ...], rooms: dict[str, Room | None]
    ) -> tuple[str, int] | None:
        """The backend with the most free bytes left after placing a request of ``needs``;
        ``rooms`` holds each backend's room at this instant (refreshed on placement)."""
        best: tuple[str, int] | None = None
        best_score = 0.0
        for url, need in needs:
            room = rooms.get(url)
            score = None if room is None else room.score(need)
            if score is not None and (best is None or score > best_score):
                best, best_score = (url, need), score
        return best

    def _pump_pool(self, pool: Pool, now: float) -> None:
        if not self.config.enabled:
            return
        pool.retarget()
        if not len(pool.queue):
            pool.codel.observe(0.0, now)
            return
        for e in pool.queue.expired(now):
            self._events.append((e.id, self._expiry(pool, e, now)))
            pool.waiting.pop(e.id, None)
        # Waiting for a loading or warming backend is not congestion: CoDel sheds nothing then.
        standing = pool.all_ready(now)
        for priority in (_SHEDDABLE, _STANDARD):
            if not standing or not pool.codel.sheds(priority):
                continue
            for e in pool.queue.band_entries(priority):
                if now - e.enqueued_at >= pool.codel.target_s:
                    self._drop(pool, e.id)
                    wait = self._wait_estimate(pool, priority, 0.0, now)
                    msg = "queue delay above target"
                    self._events.append((e.id, Rejection(Outcome.SHED_OVERLOAD, _retry(wait), msg)))

        rooms = {url: rt.room(now) for url, rt in pool.backends.items()}
        # the largest request any backend could take now: most entries fail this one comparison
        largest = max((room.max_need for room in rooms.values() if room is not None), default=None)
        smallest = pool.smallest_need()
        if largest is None or (smallest is not None and smallest > largest):
            # Nothing fits anywhere, or not even the smallest waiting request: a scan of the
            # queue would serve nobody.
            self._stalled(pool, now)
            return
        max_room = largest
        waiting = pool.waiting

        def fits(e: Entry) -> bool:
            w = waiting[e.id]
            if w.min_need > max_room:
                return False
            best = self._best(w.needs, rooms)
            if best is None:
                return False
            self._chosen[e.id] = best
            return True

        def place(e: Entry) -> None:
            ticket = pool.waiting.pop(e.id).ticket
            url, need = self._chosen.pop(e.id)
            rt = pool.backends[url]
            placement = self._place(pool, rt, ticket, need, now - e.enqueued_at, now)
            rooms[url] = rt.room(now)
            nonlocal max_room
            max_room = max(
                (room.max_need for room in rooms.values() if room is not None), default=-1.0
            )
            self._events.append((e.id, placement))

        served = pool.queue.pump(fits, place, now)
        self._chosen.clear()
        if served:
            for e in served:
                pool.codel.observe(now - e.enqueued_at, now)
        else:
            self._stalled(pool, now)

    @staticmethod
    def _stalled(pool: Pool, now: float) -> None:
        """Nobody was served: CoDel sees the oldest entry's wait."""
        pool.codel.observe(
            pool.queue.oldest_age(now),
            now,
            may_escalate=not pool.queue.has_band(Priority.SHEDDABLE),
        )

    def _expiry(self, pool: Pool, e: Entry, now: float) -> Rejection:
        waited = now - e.enqueued_at
        cands = pool.candidates(pool.waiting[e.id].ticket)
        wait = self._start_in(pool, cands, e.priority, e.cost, now)
        if not any(b.serving(now) for b in cands):
            msg = f"backends still loading after {waited:.1f}s"
            return Rejection(Outcome.SHED_LOADING, _retry(wait), msg)
        if wait is None:
            wait = pool.drain.hold_s
        return Rejection(Outcome.SHED_DEADLINE, _retry(wait), f"not admitted within {waited:.1f}s")

    def _reprice(self, pool: Pool, *, force: bool = False) -> None:
        """Re-estimate what each queued request would reserve, costs and densities with it.
        Output lengths learned since a request was queued change all three (queued while
        the backend loaded, it was priced at its whole ``max_tokens``, three to five times
        its likely output, and would have been placed, predicted and shed at that size), and
        so do the prefixes placed since (the first of a burst sharing a system prompt makes
        the others cheaper)."""
        changed = False
        for e in pool.queue:
            ticket = pool.waiting[e.id].ticket
            cands = pool.candidates(ticket)
            needs = self._needs(cands, ticket)
            if needs == pool.waiting[e.id].needs and not force:
                continue
            changed = True
            pool.waiting[e.id] = Waiting(ticket, needs)
            cached = _cached(cands, ticket)
            pool.queue.reprice(
                e,
                float(_tokens_cost(ticket, self.outputs, cached)),
                _density(ticket, self.outputs, cached),
            )
        if changed:
            pool.reindex()

    def _review(self, pool: Pool, now: float) -> None:
        """Shed, with the predicted wait as Retry-After, every queued request whose predicted
        start has moved past its deadline. What is ahead of an entry: every byte queued in a
        band served before its own, and what its band holds that is denser (or as dense and
        queued before it): the order a tenant's turns take. A load that runs past
        its prediction proves the prediction wrong: its waiters then leave only at their
        deadline."""
        self._reprice(pool)
        if not any(b.serving(now) or not b.load_overdue(now) for b in pool.backends.values()):
            return  # every load runs past its prediction: nothing to go by but the deadline
        band_bytes = dict.fromkeys(Priority, 0.0)
        for e in pool.queue:
            band_bytes[e.priority] += e.cost
        seen = dict.fromkeys(Priority, 0.0)
        settled = pool.drain.settled(now)
        late: list[tuple[Entry, float]] = []
        for e in sorted(pool.queue, key=lambda e: (e.rank, e.id)):
            seen[e.priority] += e.cost
            ahead = seen[e.priority] + sum(b for p, b in band_bytes.items() if p < e.priority)
            cands = pool.candidates(pool.waiting[e.id].ticket)
            wait = self._start_in(pool, cands, e.priority, e.cost, now, ahead=ahead, queue=settled)
            if wait is not None and now + wait > e.deadline:
                late.append((e, wait))
        for e, wait in late:
            loading = not any(b.serving(now) for b in pool.candidates(pool.waiting[e.id].ticket))
            outcome = Outcome.SHED_LOADING if loading else Outcome.SHED_DEADLINE
            msg = f"predicted to start in {wait:.1f}s, after this request's deadline"
            self._drop(pool, e.id)
            self._events.append((e.id, Rejection(outcome, _retry(wait), msg)))

    def _reject_on_arrival(
        self, pool: Pool, ticket: Ticket, cands: list[BackendRuntime], rank: float, now: float
    ) -> Rejection | None:
        budget = ticket.deadline - now
        serving = [b for b in cands if b.serving(now)]
        wait = self._start_in(
            pool, cands, ticket.priority, 0.0, now, rank=rank, queue=pool.drain.settled(now)
        )
        if not serving:
            if wait is not None and wait > budget:
                msg = (
                    f"the model's backends are loading: predicted to start in {wait:.1f}s, "
                    f"after this request's deadline ({budget:.1f}s)"
                )
                return Rejection(Outcome.SHED_LOADING, _retry(wait), msg)
            return None
        fragmented = [b for b in serving if b.too_fragmented(self._need(b, ticket), b.view(now))]
        if len(fragmented) == len(serving):
            hold = pool.drain.hold_s
            msg = "backends too fragmented for a request this large"
            return Rejection(Outcome.SHED_FRAGMENTATION, _retry(hold), msg)
        if wait is not None and wait > budget:
            msg = f"expected wait {wait:.1f}s exceeds the deadline ({budget:.1f}s)"
            return Rejection(Outcome.SHED_DEADLINE, _retry(wait), msg)
        return None

    def _start_in(
        self,
        pool: Pool,
        cands: list[BackendRuntime],
        priority: Priority,
        extra: float,
        now: float,
        *,
        ahead: float | None = None,
        rank: float = math.inf,
        queue: bool = True,
    ) -> float | None:
        """Seconds until a request of ``priority`` is predicted to start: when a backend can
        serve (now, or the predicted end of its load or ejection), plus, with ``queue``, the
        drain of the bytes ahead of it (``ahead``, else every byte of better bands and of its
        band at least as dense as ``rank``, plus ``extra``) beyond what is free then. None when
        neither tells (no backend up and none predicted)."""
        if not cands:
            return None
        ready_at = min(b.predicted_ready_at(now) for b in cands)
        if not queue:
            return max(0.0, ready_at - now)
        drain = self._wait_estimate(pool, priority, extra, now, ahead=ahead, at=ready_at, rank=rank)
        return max(0.0, ready_at - now) + (drain or 0.0)

    def _wait_estimate(
        self,
        pool: Pool,
        priority: Priority,
        extra: float,
        now: float,
        *,
        ahead: float | None = None,
        at: float | None = None,
        rank: float = math.inf,
    ) -> float | None:
        """Seconds for the bytes ahead (by default every byte queued in better bands and in
        ``priority``'s band at least as dense as ``rank``, plus ``extra``) beyond what is free
        to drain at the measured rate; from ``at`` (a backend's predicted return) what is free
        is what it will have then."""
        rate = pool.drain.bytes_per_s(now)
        if rate is None or rate <= 0:
            return None
        if at is not None and at > now:
            free = sum(rt.free_when_up_bytes() for rt in pool.backends.values())
        else:
            free = sum(
                max(0.0, rt.view(now).free) for rt in pool.backends.values() if rt.serving(now)
            )
        queued = pool.queue.bytes_ahead(priority, rank) + extra if ahead is None else ahead
        backlog = queued - free
        return max(0.0, backlog) / rate

    def _drop(self, pool: Pool, entry_id: int) -> bool:
        pool.waiting.pop(entry_id, None)
        return pool.queue.remove(entry_id) is not None


def _tokens(rt: BackendRuntime, ticket: Ticket, outputs: OutputLengths) -> int:
    """Prompt (less what this backend likely holds of it already) plus the output its
    reservation mode reserves."""
    out = ticket.max_output_tokens
    if rt.config.reserve_mode is _LIKELY:
        out = outputs.likely(ticket.model, ticket.tenant, out)
    prompt = (
        ticket.prompt_tokens - rt.cached_tokens(ticket) if ticket.prefix else ticket.prompt_tokens
    )
    return prompt + out


def _cached(cands: list[BackendRuntime], ticket: Ticket) -> int:
    """Prompt tokens the backend holding most of the ticket's prefix likely has cached."""
    if not ticket.prefix:
        return 0
    return max((rt.cached_tokens(ticket) for rt in cands), default=0)


def _tokens_cost(ticket: Ticket, outputs: OutputLengths, cached: int) -> int:
    """KV bytes a request is charged in fair share: its uncached prompt + likely output."""
    out = outputs.likely(ticket.model, ticket.tenant, ticket.max_output_tokens)
    return (ticket.prompt_tokens - cached + out) * ticket.kv_bytes_per_token


def _density(ticket: Ticket, outputs: OutputLengths, cached: int) -> float:
    """Tokens of KV a request holds on average per token it makes: its uncached prompt and
    half its likely output, for as many steps as it makes tokens (``Entry.rank``)."""
    return (
        ticket.prompt_tokens
        - cached
        + outputs.likely(ticket.model, ticket.tenant, ticket.max_output_tokens) / 2
    )


def _retry(seconds: float | None) -> float:
    """A Retry-After value: the estimate, at least one second; one second when unknown."""
    return _MIN_RETRY_S if seconds is None else max(_MIN_RETRY_S, seconds)
