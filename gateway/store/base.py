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
    """Async access to bucket state; every call is one round trip for a networked store.

    ``specs`` and the amounts or deltas are parallel sequences. Amounts are in each spec's unit.
    """

    async def acquire(self, specs: Sequence[BucketSpec], amounts: Sequence[float]) -> Verdict:
        """Take every amount from its bucket, or none (see ``gateway.core.bucket.try_take``)."""
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
