"""What every replica holds on one backend, shared through a store: the pure twin of
``gateway/store/lua/reserve.lua`` and ``beat.lua``. Pure: time is an argument.

Each replica publishes one number per backend, the KV bytes it holds or is about to hold there
(``BackendRuntime.reserved_bytes``), stamped with a sequence number that grows with every write
it sends. The figure is absolute, so writes are idempotent and a lost or reordered one is
corrected by the next (an older sequence number never overwrites a newer one). A replica renews
its heartbeat with every write; one whose heartbeat is older than the lease is dead and its bytes
are dropped by the next call of any replica.

``reserve`` is a placement's confirmation: it writes the new figure only when it and every other
live replica's figure fit under ``limit``; ``beat`` writes unconditionally (a release, or the
periodic refresh). Both answer the sum of the other live replicas' figures ("foreign" bytes),
which the replica's admission subtracts from what it plans on that backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LeaseBook:
    """One backend's shared state: per replica its bytes, the sequence number of the write that
    set them, and when its heartbeat expires."""

    held: dict[str, int] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)
    expires: dict[str, float] = field(default_factory=dict)

    def reserve(
        self, replica: str, seq: int, nbytes: int, limit: float, lease_s: float, now: float
    ) -> tuple[bool, int]:
        """Record ``nbytes`` as ``replica``'s figure if everything live fits under ``limit``.
        Answers (recorded, foreign bytes)."""
        self._prune(now)
        self.expires[replica] = now + lease_s
        foreign = self._foreign(replica)
        if nbytes + foreign > limit:
            return False, foreign
        self._write(replica, seq, nbytes)
        return True, foreign

    def beat(self, replica: str, seq: int, nbytes: int, lease_s: float, now: float) -> int:
        """Record ``nbytes`` as ``replica``'s figure and renew its heartbeat; the foreign bytes."""
        self._prune(now)
        self.expires[replica] = now + lease_s
        self._write(replica, seq, nbytes)
        return self._foreign(replica)

    def total(self, now: float) -> int:
        """Bytes held by every live replica."""
        return sum(n for r, n in self.held.items() if self.expires.get(r, now) > now)

    def _write(self, replica: str, seq: int, nbytes: int) -> None:
        if seq > self.seqs.get(replica, -1):
            self.seqs[replica] = seq
            self.held[replica] = nbytes

    def _foreign(self, replica: str) -> int:
        return sum(n for r, n in self.held.items() if r != replica)

    def _prune(self, now: float) -> None:
        for r in [r for r, at in self.expires.items() if at <= now]:
            del self.expires[r]
            self.held.pop(r, None)
            self.seqs.pop(r, None)
