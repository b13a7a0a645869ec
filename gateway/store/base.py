"""The ``LimitStore`` protocol: where token-bucket state lives (in process, or shared in Redis).

A store keeps one GCRA timestamp per ``BucketSpec.key`` and applies ``gateway.core.bucket`` to
it atomically: a take across several buckets is all or nothing, even between gateway replicas.
Failures of the store's own I/O surface as ``gateway.errors.StoreError`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.core.bucket import BucketSpec, Verdict
from gateway.errors import StoreError

__all__ = ["LimitStore", "StoreError"]


class LimitStore(Protocol):
    """Access to bucket state. ``specs`` and the amounts or deltas are parallel sequences, in
    each spec's unit.

    Each verb has a synchronous ``_now`` form that answers without suspending when the store can
    (the in-process one always can): a coroutine per request is measurable overhead on the hot
    path, and a call that never suspends cannot be cut short by a client leaving. Where it
    cannot, the ``_now`` form returns ``None``/``False`` and the caller awaits the async verb,
    one round trip for a networked store.
    """

    @property
    def degraded(self) -> bool:
        """True while the store cannot reach its shared state and answers by its fallback
        policy (``on_error``); always False for a store with no shared state."""
        ...

    def acquire_now(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict | None:
        """``acquire`` without suspending, or None when only a round trip can tell."""
        ...

    async def acquire(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        """Take every amount from its bucket, or none (see ``gateway.core.bucket.try_take``);
        buckets that ``waits`` may pass a take that waits up to ``max_wait_s``
        (``Verdict.wait_s``)."""
        ...

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        """``adjust`` without suspending; False when only a round trip can (nothing changed)."""
        ...

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        """Settle a finished request: a delta < 0 refunds (never above full), > 0 charges."""
        ...

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        """Units left in each bucket now, without changing anything."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...
