"""A share of every bucket: what one of N workers with the in-memory store may take.

``ScaledLimitStore`` passes every call to its inner store with each bucket's rate and burst
multiplied by ``share``, so N workers each holding ``1/N`` stay together within the policy's
limits (``gateway.workers`` explains the rule). Amounts are not scaled: a request larger than one
worker's share of a burst is refused as never fitting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gateway.core.bucket import BucketSpec, Verdict
from gateway.store.base import LimitStore


class ScaledLimitStore:
    __slots__ = ("_inner", "_share", "_specs")

    def __init__(self, inner: LimitStore, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self._inner = inner
        self._share = share
        self._specs: dict[tuple[BucketSpec, ...], tuple[BucketSpec, ...]] = {}

    @property
    def degraded(self) -> bool:
        return self._inner.degraded

    def _scaled(self, specs: Sequence[BucketSpec]) -> tuple[BucketSpec, ...]:
        key = tuple(specs)
        scaled = self._specs.get(key)
        if scaled is None:
            if len(self._specs) >= 4096:  # bounded by the policy; a reload starts anew
                self._specs.clear()
            k = self._share
            scaled = self._specs[key] = tuple(
                dataclasses.replace(s, rate_per_s=s.rate_per_s * k, burst=s.burst * k) for s in key
            )
        return scaled

    def acquire_now(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict | None:
        return self._inner.acquire_now(self._scaled(specs), amounts, max_wait_s)

    async def acquire(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        return await self._inner.acquire(self._scaled(specs), amounts, max_wait_s)

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        return self._inner.adjust_now(self._scaled(specs), deltas)

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        await self._inner.adjust(self._scaled(specs), deltas)

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        return await self._inner.peek(self._scaled(specs))

    async def close(self) -> None:
        await self._inner.close()
