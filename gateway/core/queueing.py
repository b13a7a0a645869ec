"""The admission queue as pure data: priority bands, fair share between tenants, ageing.

Order: priority band first (critical < standard < sheddable); inside a band, deficit round robin
between tenants on KV bytes, each visit granting ``quantum * weight`` (quantum: the largest
queued cost / the smallest weight, so one visit can always pay for any entry); inside a tenant,
densest first: fewest tokens of KV held per token made (``Entry.rank``), then FIFO. Under
overload that spends the memory a tenant's share buys on the requests that make the most output
with it (the large ones wait, and leave by CoDel or their deadline); it changes no tenant's
share, which is counted in bytes. No head-of-line blocking: an entry that does not fit now is
skipped and later ones that fit are served. A tenant whose turn is cut short because nothing of
it fits keeps its turn (and its credit) for the next pump, so capacity freed one request at a
time still splits by weight.

Ageing: an entry that has waited ``age_bound_s`` is served first within its band; if it does not
fit, nothing of its band or lower is served until it does (room is kept for it as memory frees),
so it is served within ``age_bound_s`` plus the time for enough in-flight work to finish.
Higher bands still pass it.

``CoDel`` and ``DrainRate`` measure the queue over time for shedding and Retry-After.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gateway.core.types import Priority

# Members read on every request, bound once: on Python 3.11 a read off the class goes through
# the enum metaclass's ``__getattr__`` hook (about 140 ns a read; 3.12 dropped it).
_SHEDDABLE = Priority.SHEDDABLE
_STANDARD = Priority.STANDARD


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Durations in seconds. ``age_bound_s`` defaults to a quarter of ``max_wait_s``;
    ``target_delay_s`` None derives CoDel's target from measured service times."""

    max_wait_s: float = 30.0
    max_depth: int = 1000
    target_delay_s: float | None = None
    interval_s: float = 0.1
    age_bound_s: float | None = None

    @property
    def ageing_s(self) -> float:
        return self.age_bound_s if self.age_bound_s is not None else self.max_wait_s / 4


@dataclass(slots=True, eq=False)
class Entry:
    """One waiting request. ``cost`` is its KV bytes, the currency of fair share; ``rank`` its
    density, tokens of KV held on average per token it makes (prompt + output / 2: a sequence
    holds its prompt and, on average, half its output while it decodes); equal ranks are FIFO."""

    id: int
    tenant: str
    priority: Priority
    weight: float
    cost: float
    enqueued_at: float
    deadline: float
    rank: float = 0.0


def _order(e: Entry) -> tuple[float, int]:
    return (e.rank, e.id)


class _Band:
    __slots__ = ("deficit", "flows", "in_turn", "ring")

    def __init__(self) -> None:
        self.flows: dict[str, list[Entry]] = {}  # each tenant's entries, densest first
        self.ring: deque[str] = deque()
        self.deficit: dict[str, float] = {}
        self.in_turn: set[str] = set()

    def drop_tenant(self, tenant: str) -> None:
        del self.flows[tenant]
        self.ring.remove(tenant)
        self.deficit.pop(tenant, None)
        self.in_turn.discard(tenant)


class FairQueue:
    """Waiting entries; ``pump`` hands out those that fit, in the order described above."""

    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self._bands = {p: _Band() for p in Priority}
        self._by_id: dict[int, Entry] = {}  # in push order, so the first is the oldest
        self._bytes = 0.0
        self._band_bytes = dict.fromkeys(Priority, 0.0)
        self._deadlines: list[tuple[float, int]] = []  # heap; entries removed lazily

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._by_id.values())

    @property
    def queued_bytes(self) -> float:
        return self._bytes

    def push(self, entry: Entry) -> bool:
        """Add ``entry``; False (and nothing added) when the queue is at ``max_depth``."""
        if len(self._by_id) >= self.config.max_depth:
            return False
        band = self._bands[entry.priority]
        flow = band.flows.get(entry.tenant)
        if flow is None:
            flow = band.flows[entry.tenant] = []
            band.ring.append(entry.tenant)
            band.deficit[entry.tenant] = 0.0
        bisect.insort(flow, entry, key=_order)
        self._by_id[entry.id] = entry
        self._bytes += entry.cost
        self._band_bytes[entry.priority] += entry.cost
        heapq.heappush(self._deadlines, (entry.deadline, entry.id))
        return True

    def remove(self, entry_id: int) -> Entry | None:
        entry = self._by_id.pop(entry_id, None)
        if entry is None:
            return None
        self._bytes -= entry.cost
        self._band_bytes[entry.priority] -= entry.cost
        band = self._bands[entry.priority]
        flow = band.flows[entry.tenant]
        flow.remove(entry)
        if not flow:
            band.drop_tenant(entry.tenant)
        return entry

    def reprice(self, entry: Entry, cost: float, rank: float) -> None:
        """A queued entry's cost and density were re-estimated; its tenant keeps its credit."""
        flow = self._bands[entry.priority].flows[entry.tenant]
        flow.remove(entry)
        self._bytes += cost - entry.cost
        self._band_bytes[entry.priority] += cost - entry.cost
        entry.cost = cost
        entry.rank = rank
        bisect.insort(flow, entry, key=_order)

    def expired(self, now: float) -> list[Entry]:
        """Remove and return entries whose deadline has passed."""
        late: list[Entry] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, entry_id = heapq.heappop(self._deadlines)
            entry = self.remove(entry_id)
            if entry is not None:
                late.append(entry)
        return late

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][1] not in self._by_id:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def oldest(self) -> Entry | None:
        return next(iter(self._by_id.values()), None)

    def oldest_age(self, now: float) -> float:
        first = self.oldest()
        return 0.0 if first is None else now - first.enqueued_at

    def bytes_ahead(self, priority: Priority, rank: float = math.inf) -> float:
        """Bytes queued in the bands served before ``priority``'s, and in its own band by
        entries no less dense than ``rank`` (by default all of it): what a tenant's turns
        serve before an entry of that density."""
        # float starts: compiled with mypyc, a sum without one is typed int
        before = sum((b for p, b in self._band_bytes.items() if p < priority), 0.0)
        if rank == math.inf:
            return before + self._band_bytes[priority]
        flows = self._bands[priority].flows.values()
        return before + sum((e.cost for flow in flows for e in flow if e.rank <= rank), 0.0)

    def has_band(self, priority: Priority) -> bool:
        return bool(self._bands[priority].flows)

    def band_entries(self, priority: Priority) -> list[Entry]:
        return [e for flow in self._bands[priority].flows.values() for e in flow]

    def pump(
        self, fits: Callable[[Entry], bool], place: Callable[[Entry], None], now: float
    ) -> list[Entry]:
        """Remove and return, in service order, the entries that can be placed now.

        ``fits(e)`` tells whether ``e`` could be placed at this instant; ``place(e)`` places it
        (so later ``fits`` calls see the capacity it took). Both are called synchronously.
        """
        served: list[Entry] = []
        for priority in Priority:
            band = self._bands[priority]
            if not band.flows:
                continue
            if not self._serve_aged(band, fits, place, now, served):
                break  # an aged entry keeps the room that frees: no lower band passes it
            self._serve_turns(band, fits, place, served)
        return served

    def _take(self, entry: Entry, place: Callable[[Entry], None], served: list[Entry]) -> None:
        place(entry)
        self.remove(entry.id)
        served.append(entry)

    def _serve_aged(
        self,
        band: _Band,
        fits: Callable[[Entry], bool],
        place: Callable[[Entry], None],
        now: float,
        served: list[Entry],
    ) -> bool:
        bound = self.config.ageing_s
        if self.oldest_age(now) < bound:
            return True  # not even the oldest entry of the queue has aged
        aged: list[Entry] = []
        for flow in band.flows.values():
            aged.extend(e for e in flow if now - e.enqueued_at >= bound)
        aged.sort(key=lambda e: (e.enqueued_at, e.id))
        for e in aged:
            if not fits(e):
                return False
            band.deficit[e.tenant] = band.deficit.get(e.tenant, 0.0) - e.cost
            self._take(e, place, served)
        return True

    def _serve_turns(
        self,
        band: _Band,
        fits: Callable[[Entry], bool],
        place: Callable[[Entry], None],
        served: list[Entry],
    ) -> None:
        progress = True
        while progress and band.ring:
            progress = False
            for tenant in list(band.ring):
                flow = band.flows.get(tenant)
                if flow is None:
                    continue
                if tenant not in band.in_turn:
                    if not any(fits(e) for e in flow):
                        continue  # nothing of it fits: it keeps its place, gets no credit
                    band.deficit[tenant] += self._quantum(band) * flow[0].weight
                    band.in_turn.add(tenant)
                turn_over = False
                for e in list(flow):
                    if not fits(e):
                        continue
                    if e.cost > band.deficit[tenant]:
                        turn_over = True
                        break
                    band.deficit[tenant] -= e.cost
                    self._take(e, place, served)
                    progress = True
                if tenant not in band.flows:
                    continue  # its flow emptied: dropped with its credit
                if turn_over:
                    band.in_turn.discard(tenant)
                    band.ring.remove(tenant)
                    band.ring.append(tenant)
                    progress = True

    @staticmethod
    def _quantum(band: _Band) -> float:
        costs = (e.cost for flow in band.flows.values() for e in flow)
        weights = (flow[0].weight for flow in band.flows.values())
        return max(costs, default=1.0) / max(min(weights, default=1.0), 1e-9)


class CoDel:
    """Queue delay above ``target_s`` for ``interval_s`` raises the shedding level.

    Level 1 sheds the sheddable band; level 2 (reached after a further interval above target
    once no sheddable entry is left to shed, and only where ``max_level`` allows it) sheds
    standard. Critical is never shed for delay. One delay sample below target returns to level
    0, as CoDel leaves its dropping state.
    """

    __slots__ = ("_above_since", "interval_s", "level", "max_level", "target_s")

    def __init__(self, target_s: float, interval_s: float, max_level: int = 2) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.max_level = max_level
        self.level = 0
        self._above_since: float | None = None

    def observe(self, delay_s: float, now: float, *, may_escalate: bool = True) -> None:
        if delay_s < self.target_s:
            self.level = 0
            self._above_since = None
            return
        if self._above_since is None:
            self._above_since = now
        elif now - self._above_since >= self.interval_s and (self.level == 0 or may_escalate):
            self.level = min(self.max_level, self.level + 1)
            self._above_since = now

    def sheds(self, priority: Priority) -> bool:
        if priority is _SHEDDABLE:
            return self.level >= 1
        return priority is _STANDARD and self.level >= 2

    def next_check_at(self) -> float | None:
        return None if self._above_since is None else self._above_since + self.interval_s


class DrainRate:
    """KV bytes finished per second over the last ``window_s``, and the typical time a request
    holds its reservation (EWMA). Both are None until something has finished."""

    __slots__ = ("_done", "_hold_s", "_since", "_total", "window_s")

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._done: deque[tuple[float, float]] = deque()
        # Kept alongside the window: at thousands of requests a second it holds tens of
        # thousands of entries, and the rate is read for every queued arrival.
        self._total = 0.0
        self._hold_s: float | None = None
        self._since: float | None = None  # the first finish since the window was last empty

    def record(self, nbytes: float, held_s: float, now: float) -> None:
        self._trim(now)
        if not self._done:
            self._since = now
        self._done.append((now, nbytes))
        self._total += nbytes
        held = max(0.0, held_s)
        self._hold_s = held if self._hold_s is None else self._hold_s + 0.1 * (held - self._hold_s)

    def bytes_per_s(self, now: float) -> float | None:
        self._trim(now)
        if not self._done:
            return None
        span = max(now - self._done[0][0], self.window_s / 10)
        return self._total / span

    @property
    def hold_s(self) -> float | None:
        return self._hold_s

    def settled(self, now: float) -> bool:
        """Finishes have come without a gap of ``window_s`` for at least one typical hold
        time, so requests placed after the first ones to finish have had time to finish too.
        The first finishes after a load (or an idle spell) are of requests placed while the
        warm-up ramp held the backend back, at whole-``max_tokens`` reservations, before any
        overcommit: on cold_start their rate predicted 4-50 s waits for requests that a warm
        backend started within their deadline."""
        self._trim(now)
        since, hold = self._since, self._hold_s
        return since is not None and hold is not None and now - since >= hold

    def _trim(self, now: float) -> None:
        done = self._done
        while done and done[0][0] < now - self.window_s:
            self._total -= done.popleft()[1]
        if not done:
            self._total = 0.0  # no float drift survives an empty window
            self._since = None
