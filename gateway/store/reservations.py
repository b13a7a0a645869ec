"""Shared in-flight reservations: what every replica holds on each backend, in Redis.

One Lua call confirms a placement (``reserve.lua``: check every live replica's figure against the
backend's limit and record this replica's new one) and one records a release or a heartbeat
(``beat.lua``); ``gateway.core.shared.LeaseBook`` is their pure twin and documents the
semantics. Keys are ``kvgate:{<prefix>|<backend url>}:held``, ``:seqs``, ``:beats``, ``:wants``
and ``:bands``: the hash tag is per backend, so in Redis Cluster each call touches one slot and
backends spread across the cluster. Time comes from Redis ``TIME`` unless a ``clock`` is given
(tests). Every Redis or socket failure is raised as ``gateway.errors.StoreError``; ``timeout_s``
bounds each reply, so a dead Redis costs a request at most that long before the caller falls
back.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.core.clock import Clock
from gateway.store.base import StoreError
from gateway.store.redis import script_source

_Arg = str | float | int


def lease_script(name: str) -> str:
    """``reserve`` or ``beat``, after the steps they share (``lease.lua``: Redis scripts cannot
    import)."""
    return script_source("lease") + "\n" + script_source(name)


def backend_keys(prefix: str, url: str) -> list[str]:
    """The five keys of one backend, in the order the scripts take them."""
    tag = f"kvgate:{{{prefix}|{url.replace('{', '%7B').replace('}', '%7D')}}}"
    return [f"{tag}:held", f"{tag}:seqs", f"{tag}:beats", f"{tag}:wants", f"{tag}:bands"]


def reserve_args(
    now: _Arg,
    replica: str,
    seq: int,
    nbytes: int,
    lease_s: float,
    limit: float,
    weight: float,
    band: int = 0,
) -> list[_Arg]:
    """ARGV of ``reserve.lua``."""
    cap = limit if math.isfinite(limit) else 2**62
    return [*_common(now, replica, seq, nbytes, lease_s), cap, weight, band]


def beat_args(
    now: _Arg,
    replica: str,
    seq: int,
    nbytes: int,
    lease_s: float,
    want: float,
    limit: float | None = None,
    band: int | None = None,
) -> list[_Arg]:
    """ARGV of ``beat.lua`` (``limit`` None: unknown, no fairness applied; ``band`` None:
    nothing waits)."""
    cap = 0 if limit is None else limit if math.isfinite(limit) else 2**62
    return [*_common(now, replica, seq, nbytes, lease_s), want, cap, "" if band is None else band]


def _common(now: _Arg, replica: str, seq: int, nbytes: int, lease_s: float) -> list[_Arg]:
    ttl_ms = max(1000, math.ceil(lease_s * 2000))  # keys outlive every heartbeat they hold
    return [now, replica, seq, nbytes, lease_s, ttl_ms]


class RedisReservations:
    """This replica's view of the shared reservations at ``url`` (Redis)."""

    def __init__(
        self,
        url: str,
        replica: str,
        *,
        prefix: str = "kvgate",
        lease_s: float = 5.0,
        timeout_s: float = 0.2,
        clock: Clock | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        self.replica = replica
        self.lease_s = lease_s
        self._prefix = prefix
        self._clock = clock
        self._seq = 0
        # A broken pooled connection (Redis restarted) is retried once on a fresh one; a timeout
        # is not, so a dead Redis reaches the fallback within one timeout.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=retry
        )
        self._reserve = self._redis.register_script(lease_script("reserve"))
        self._beat = self._redis.register_script(lease_script("beat"))

    def _next(self) -> tuple[_Arg, int]:
        self._seq += 1
        return ("" if self._clock is None else self._clock.now()), self._seq

    async def reserve(
        self, backend: str, nbytes: int, limit: float, weight: float = 1.0, band: int = 0
    ) -> tuple[bool, int]:
        """Record ``nbytes`` as this replica's figure on ``backend`` if every live replica's
        figure fits under ``limit``, no waiting replica is kept below its share (``weight``:
        the requesting tenant's) and none waits with a better band than ``band`` (the
        request's); (recorded, other replicas' bytes)."""
        now, seq = self._next()
        args = reserve_args(now, self.replica, seq, nbytes, self.lease_s, limit, weight, band)
        try:
            reply = await self._reserve(keys=backend_keys(self._prefix, backend), args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"shared admission: reserve failed: {exc}") from exc
        return reply[0] == 1, int(reply[1])

    async def beat(
        self,
        backend: str,
        nbytes: int,
        want: float = 0.0,
        limit: float | None = None,
        band: int | None = None,
    ) -> int:
        """Record ``nbytes``, demand ``want`` and the best band waiting (``band``) as this
        replica's on ``backend`` and renew its heartbeat; the bytes there it may not plan on
        (``gateway.core.shared``)."""
        now, seq = self._next()
        args = beat_args(now, self.replica, seq, nbytes, self.lease_s, want, limit, band)
        try:
            reply = await self._beat(keys=backend_keys(self._prefix, backend), args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"shared admission: heartbeat failed: {exc}") from exc
        return int(reply)

    async def close(self) -> None:
        await self._redis.aclose()
