"""One model's admission state, and the configuration and tickets it is built from. Pure.

``gateway.core.admission`` decides with it; this module keeps what each model's pool holds:
the runtimes of its backends, its fair queue, CoDel state, drain rate and the tickets waiting in
the queue, with each ticket's need per candidate backend computed once.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import msgspec

from gateway.core.backend import BackendConfig, BackendRuntime
from gateway.core.capacity import CapacityConfig
from gateway.core.queueing import CoDel, DrainRate, FairQueue, QueueConfig
from gateway.core.types import Priority


@dataclass(frozen=True, slots=True)
class ModelPool:
    name: str
    kv_bytes_per_token: int
    backends: tuple[BackendConfig, ...]


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """The compiled ``admission:`` section plus every model's backends."""

    models: tuple[ModelPool, ...]
    enabled: bool = True
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    output_quantile: float = 0.9


class Ticket(msgspec.Struct, frozen=True, gc=False):
    """What admission needs to know about one request. ``deadline`` is monotonic seconds."""

    tenant: str
    model: str
    priority: Priority
    weight: float
    prompt_tokens: int
    max_output_tokens: int
    kv_bytes_per_token: int
    deadline: float
    exclude: frozenset[str] = frozenset()
    # the prompt's chunk hashes (``gateway.core.prefixes``) when its model's backends cache
    # prefixes, and the tokens one chunk stands for
    prefix: tuple[int, ...] = ()
    chunk_tokens: float = 0.0


@dataclass(slots=True)
class Waiting:
    """A queued ticket and, per candidate backend URL, the bytes it would reserve there
    (computed once when queued, or on reload: the pump only compares numbers)."""

    ticket: Ticket
    needs: tuple[tuple[str, int], ...]
    min_need: int = 0

    def __post_init__(self) -> None:
        self.min_need = min((need for _, need in self.needs), default=0)


class Pool:
    """One model's admission state: its backends, queue, CoDel, drain rate and waiting
    tickets, with an index of the smallest need among them."""

    def __init__(self, spec: ModelPool, config: AdmissionConfig, now: float) -> None:
        self.spec = spec
        self.backends: dict[str, BackendRuntime] = {}
        self.queue = FairQueue(config.queue)
        self.codel = CoDel(math.inf, config.queue.interval_s)
        self.drain = DrainRate()
        self.review_at = now  # next check of the queue's predicted starts against deadlines
        self.waiting: dict[int, Waiting] = {}
        # (min_need, entry id) of the waiting entries, deleted lazily: lets a pump skip the
        # queue when not even its smallest request fits (a pump runs on every release).
        self._smallest: list[tuple[int, int]] = []
        self.rr = 0
        self.retune(spec, config, now)

    def retune(self, spec: ModelPool, config: AdmissionConfig, now: float) -> None:
        """Adopt a new policy; backends whose URL persists keep their state and leases."""
        self.spec = spec
        kept = self.backends
        self.backends = {}
        for bc in spec.backends:
            rt = kept.get(bc.url)
            if rt is None:
                rt = BackendRuntime(
                    bc, kv_bytes_per_token=spec.kv_bytes_per_token, cap=config.capacity, now=now
                )
            else:
                rt.retune(bc, kv_bytes_per_token=spec.kv_bytes_per_token, cap=config.capacity)
            self.backends[bc.url] = rt
        self.queue.config = config.queue
        self.retarget()

    def retarget(self) -> None:
        """CoDel's target and interval: the policy's, or with ``target_delay: auto`` the time
        a request of this model holds its memory (measured), so a standing queue is one that
        stays longer than one service time (none until a request has finished), and then it
        sheds only the sheddable band: standard and critical requests leave the queue only by
        their deadline. An explicit target is the operator's latency goal for standard too."""
        q = self.queue.config
        if q.target_delay_s is not None:
            self.codel.target_s, self.codel.interval_s = q.target_delay_s, q.interval_s
            self.codel.max_level = 2
            return
        self.codel.max_level = 1
        hold = self.drain.hold_s
        target = hold if hold is not None and hold > 0 else math.inf
        self.codel.target_s = target
        self.codel.interval_s = max(q.interval_s, target) if target < math.inf else q.interval_s

    def all_ready(self, now: float) -> bool:
        """Every backend is fully up: queueing now is congestion, not waiting for capacity
        that is on its way."""
        return all(rt.ready(now) for rt in self.backends.values())

    def candidates(self, ticket: Ticket) -> list[BackendRuntime]:
        return [b for url, b in self.backends.items() if url not in ticket.exclude]

    def wait(self, entry_id: int, waiting: Waiting) -> None:
        self.waiting[entry_id] = waiting
        heapq.heappush(self._smallest, (waiting.min_need, entry_id))
        if len(self._smallest) > 2 * len(self.waiting) + 64:
            self.reindex()

    def reindex(self) -> None:
        """Rebuild the smallest-need index: after needs changed, or when deleted entries
        pile up under one that waits long."""
        self._smallest = [(w.min_need, eid) for eid, w in self.waiting.items()]
        heapq.heapify(self._smallest)

    def smallest_need(self) -> int | None:
        heap = self._smallest
        while heap and heap[0][1] not in self.waiting:
            heapq.heappop(heap)
        return heap[0][0] if heap else None
