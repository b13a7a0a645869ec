"""What the gateway does while its shared limit store is down: the policy's ``on_error``.

``FallbackLimitStore`` sends every call to the primary store. When the primary raises
``StoreError`` it is *degraded*: calls are answered by the fallback policy (``local``: the
in-process store decides, each bucket cut to this gateway's share of ``replicas`` gateways, so
the fleet together stays near the shared limit; ``allow``: every take passes; ``deny``: every
take is refused with ``store_error`` set, which the proxy answers with 503). The primary is tried
again after a back-off that doubles per consecutive failure (``backoff_s`` up to
``max_backoff_s``), by one call at a time while the others keep using the fallback; its first
success ends the degraded state.

Settlement goes to the store in use when the request settles. Around a transition a refund can
land in the other store than the one that reserved (refunds never lift a bucket above full, so
the error is bounded by one request's reservation), and under ``allow``/``deny`` a reservation
taken by the primary just before an outage is not refunded (it errs on the side of the limit).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar, get_args

from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.clock import Clock, MonotonicClock
from gateway.store.base import LimitStore, StoreError
from gateway.store.memory import MemoryLimitStore

OnError = Literal["local", "allow", "deny"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class _Down(enum.Enum):
    DOWN = 0


class FallbackLimitStore:
    """A ``LimitStore`` that survives its primary's outages by the ``on_error`` policy."""

    __slots__ = (
        "_backoff_s",
        "_clock",
        "_degraded",
        "_failures",
        "_local",
        "_max_backoff_s",
        "_next_backoff_s",
        "_on_error",
        "_primary",
        "_probing",
        "_replicas",
        "_retry_at",
        "_shares",
    )

    def __init__(
        self,
        primary: LimitStore,
        local: MemoryLimitStore,
        on_error: OnError,
        *,
        clock: Clock | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        replicas: int = 1,
    ) -> None:
        if on_error not in get_args(OnError):
            raise ValueError(f"on_error must be one of {get_args(OnError)}, got {on_error!r}")
        if not 0 < backoff_s <= max_backoff_s:
            raise ValueError("need 0 < backoff_s <= max_backoff_s")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self._replicas = replicas
        self._shares: dict[tuple[BucketSpec, ...], tuple[BucketSpec, ...]] = {}
        self._primary = primary
        self._local = local
        self._on_error: OnError = on_error
        self._clock = clock if clock is not None else MonotonicClock()
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._next_backoff_s = backoff_s
        self._degraded = False
        self._probing = False
        self._retry_at = 0.0
        self._failures = 0

    @property
    def degraded(self) -> bool:
        """True while the primary is considered down and the fallback policy answers."""
        return self._degraded

    def acquire_now(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> None:
        return None  # the primary is asked first, even while degraded (a probe may be due)

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        return False

    @property
    def failures(self) -> int:
        """Store errors seen since start (a counter, for metrics)."""
        return self._failures

    @property
    def on_error(self) -> OnError:
        return self._on_error

    async def _call(self, call: Callable[[], Awaitable[_T]]) -> _T | Literal[_Down.DOWN]:
        """``call()`` on the primary, or ``DOWN`` when it failed or is resting after a failure."""
        probe = self._degraded
        if probe:
            if self._probing or self._clock.now() < self._retry_at:
                return _Down.DOWN
            self._probing = True
        try:
            result = await call()
        except StoreError as exc:
            self._failures += 1
            if probe or not self._degraded:
                # A call already in flight when the outage began does not extend the back-off.
                if not self._degraded:
                    _log.warning(
                        "limit store failed (%s); on_error=%s until it recovers",
                        exc,
                        self._on_error,
                    )
                self._degraded = True
                self._retry_at = self._clock.now() + self._next_backoff_s
                self._next_backoff_s = min(2 * self._next_backoff_s, self._max_backoff_s)
            return _Down.DOWN
        finally:
            if probe:
                self._probing = False  # also when the caller was cancelled mid-call
        if self._degraded:
            self._degraded = False
            self._next_backoff_s = self._backoff_s
            _log.warning("limit store recovered; leaving on_error=%s", self._on_error)
        return result

    async def acquire(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        verdict = await self._call(lambda: self._primary.acquire(specs, amounts, max_wait_s))
        if verdict is not _Down.DOWN:
            return verdict
        if self._on_error == "local":
            return self._local.acquire_now(self._share(specs), amounts, max_wait_s)
        count = len(specs)
        if self._on_error == "allow":
            bursts = tuple(spec.burst for spec in specs)
            return Verdict(allowed=True, remaining=bursts, reset_s=(0.0,) * count, store_error=True)
        wait_s = max(self._retry_at - self._clock.now(), self._backoff_s)
        zeros = (0.0,) * count
        return Verdict(
            allowed=False, retry_after_s=wait_s, remaining=zeros, reset_s=zeros, store_error=True
        )

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        done = await self._call(lambda: self._primary.adjust(specs, deltas))
        if done is _Down.DOWN and self._on_error == "local":
            self._local.adjust_now(self._share(specs), deltas)

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        """Remaining from the primary; while degraded, from the local store under ``local``,
        else ``StoreError`` (allow and deny keep no state to show)."""
        remaining = await self._call(lambda: self._primary.peek(specs))
        if remaining is not _Down.DOWN:
            return remaining
        if self._on_error == "local":
            return self._local.peek_now(self._share(specs))
        raise StoreError(f"limit store is down (on_error={self._on_error}); nothing to show")

    def _share(self, specs: Sequence[BucketSpec]) -> tuple[BucketSpec, ...]:
        """This gateway's share of each bucket: rate and burst over ``replicas``."""
        key = tuple(specs)
        if self._replicas == 1:
            return key
        shared = self._shares.get(key)
        if shared is None:
            if len(self._shares) >= 4096:  # bounded by the policy; a reload starts anew
                self._shares.clear()
            n = self._replicas
            shared = self._shares[key] = tuple(
                BucketSpec(s.key, s.unit, s.rate_per_s / n, s.burst / n, s.waits) for s in key
            )
        return shared

    async def close(self) -> None:
        try:
            await self._primary.close()
        finally:
            await self._local.close()
