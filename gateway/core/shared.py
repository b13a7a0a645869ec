"""What every replica holds on one backend, shared through a store: the pure twin of
``gateway/store/lua/reserve.lua`` and ``beat.lua``. Pure: time is an argument.

Each replica publishes one number per backend, the KV bytes it holds or is about to hold there,
or on a slot backend (llama.cpp) the slots (``BackendRuntime.shared_held``; "bytes" below means
that unit), stamped with a sequence number that grows with every write
it sends. The figure is absolute, so writes are idempotent and a lost or reordered one is
corrected by the next (an older sequence number never overwrites a newer one). A replica renews
its heartbeat with every write; one whose heartbeat is older than the lease is dead and its bytes
are dropped by the next call of any replica.

``reserve`` is a placement's confirmation: it writes the new figure only when it and every other
live replica's figure fit under ``limit``; ``beat`` writes unconditionally (a release, or the
periodic refresh). Both answer the bytes this replica may not plan on ("foreign" bytes): the sum
of the other live replicas' figures, or more while fairness holds it to its share (below), which
its admission subtracts from what it plans on that backend, so it queues instead of asking again.

Fairness between replicas: with its figure a beat publishes the replica's *demand*, the summed
weights of the tenants waiting in its queue for the backend (0: nobody waits). While another
replica waits, a reservation may take a replica past its weighted share of ``limit`` only if
every waiting replica already holds its own share (max-min fairness, work-conserving): without
it the replica that frees memory takes it back at once, before the others hear it is free.

Priority bands across replicas: with its demand a beat publishes the best band waiting there
(lower is better), and a reservation names its request's band. While another replica waits
with a better band, a reservation is refused and answers the whole limit as foreign, so the
replica plans nothing until its next beat: what frees goes to the better band, wherever it
waits. (Holding it to its figure would not do: a replica reuses what its own requests free
before its lower figure is published.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class LeaseBook:
    """One backend's shared state: per replica its bytes, its demand, the sequence number of
    the write that set them, and when its heartbeat expires."""

    held: dict[str, int] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)
    expires: dict[str, float] = field(default_factory=dict)
    wants: dict[str, float] = field(default_factory=dict)
    bands: dict[str, int] = field(default_factory=dict)  # best band waiting, where any waits

    def reserve(
        self,
        replica: str,
        seq: int,
        nbytes: int,
        limit: float,
        lease_s: float,
        now: float,
        weight: float = 1.0,
        band: int = 0,
    ) -> tuple[bool, int]:
        """Record ``nbytes`` as ``replica``'s figure if everything live fits under ``limit``,
        no waiting replica is held below its share by it (``weight``: the requesting tenant's)
        and none waits with a better band than ``band`` (the request's).
        Answers (recorded, foreign bytes)."""
        self._prune(now)
        self.expires[replica] = now + lease_s
        foreign = self._foreign(replica)
        cap = self._cap(replica, limit, weight, band)
        if any(
            r != replica and self.wants.get(r, 0.0) > 0 and b < band for r, b in self.bands.items()
        ):
            cap = 0.0
        # integral, as Redis answers a Lua number (truncated)
        blocked = int(max(foreign, limit - cap))
        if nbytes + blocked > limit:
            return False, blocked
        self._write(replica, seq, nbytes, None)
        return True, blocked

    def beat(
        self,
        replica: str,
        seq: int,
        nbytes: int,
        lease_s: float,
        now: float,
        want: float = 0.0,
        limit: float = 0.0,
        band: int | None = None,
    ) -> int:
        """Record ``nbytes``, demand ``want`` and the best band waiting (``band``; None: none)
        as ``replica``'s and renew its heartbeat; the foreign bytes (``limit`` 0: unknown,
        fairness not applied; bands never apply here)."""
        self._prune(now)
        self.expires[replica] = now + lease_s
        if self._write(replica, seq, nbytes, want):
            if want > 0 and band is not None:
                self.bands[replica] = band
            else:
                self.bands.pop(replica, None)
        foreign = self._foreign(replica)
        if limit <= 0:
            return foreign
        mine = math.inf if band is None else band
        return int(max(foreign, limit - self._cap(replica, limit, 1.0, mine)))

    def _cap(self, replica: str, limit: float, weight: float, band: float) -> float:
        """The most ``replica`` may hold for a tenant of ``weight`` in ``band``: its weighted
        share of ``limit`` while a replica waiting in that band or a better one holds less
        than its own share, else all of it (one waiting only in worse bands takes nothing
        from it: it waits for this band anyway)."""
        waiting = [
            (r, w)
            for r, w in self.wants.items()
            if r != replica and w > 0 and self.bands.get(r, band) <= band
        ]
        if not waiting:
            return limit
        mine = max(self.wants.get(replica, 0.0), weight)
        total = mine
        for _, w in waiting:
            total += w
        if any(self.held.get(r, 0) < limit * w / total for r, w in waiting):
            return limit * mine / total
        return limit

    def total(self, now: float) -> int:
        """Bytes held by every live replica."""
        return sum(n for r, n in self.held.items() if self.expires.get(r, now) > now)

    def _write(self, replica: str, seq: int, nbytes: int, want: float | None) -> bool:
        if seq <= self.seqs.get(replica, -1):
            return False
        self.seqs[replica] = seq
        self.held[replica] = nbytes
        if want is not None:
            self.wants[replica] = want
        return True

    def _foreign(self, replica: str) -> int:
        return sum(n for r, n in self.held.items() if r != replica)

    def _prune(self, now: float) -> None:
        for r in [r for r, at in self.expires.items() if at <= now]:
            del self.expires[r]
            self.held.pop(r, None)
            self.seqs.pop(r, None)
            self.wants.pop(r, None)
            self.bands.pop(r, None)
