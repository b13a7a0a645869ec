"""The shared limit store: GCRA state in Redis, one Lua script call per acquire and per adjust.

Keys are ``kvgate:{<prefix>}:bucket:<BucketSpec.key>`` (a TAT), and for a bucket that waits
``kvgate:{<prefix>}:turn:<BucketSpec.key>`` (its last turn given) and
``kvgate:{<prefix>}:line:<BucketSpec.key>`` (where the next refused take's place in its line of
retries begins). One acquire spans a tenant's buckets and the model's buckets shared by every
tenant, and it must be atomic, so in Redis Cluster all its keys must hash to one slot. No
per-tenant or per-model tag has that property (the model's buckets are shared across tenants), so
the hash tag is the deployment's ``prefix``: all buckets of one deployment live in one slot, and
separate deployments (prefixes) spread across the cluster. A script call is a few microseconds of
Redis CPU, so one slot carries tens of thousands of requests per second; past that, split tenants
over several prefixes.

Time comes from Redis ``TIME`` (less a fixed epoch, so floats keep sub-microsecond resolution):
every replica then reads one clock, and replica clock skew cannot bend a limit. A ``clock`` passed
in replaces it (tests drive time by hand); TTLs then last at least ``CALLER_CLOCK_MIN_TTL_S`` of
real time, since the caller's seconds need not match Redis's. A key expires once its bucket would
be full again. Every Redis or socket failure is raised as ``gateway.errors.StoreError``.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.clock import Clock
from gateway.store.base import StoreError

CALLER_CLOCK_MIN_TTL_S = 60.0
"""Least key TTL when the caller gives time: real seconds, not the caller's."""

_Arg = str | float
_ReplyItem = int | bytes


def script_source(name: str) -> str:
    """The text of ``gateway/store/lua/<name>.lua`` (package data)."""
    return importlib.resources.files("gateway.store").joinpath(f"lua/{name}.lua").read_text()


def bucket_key(prefix: str, spec: BucketSpec) -> str:
    return f"kvgate:{{{prefix}}}:bucket:{spec.key}"


def turn_key(prefix: str, spec: BucketSpec) -> str:
    return f"kvgate:{{{prefix}}}:turn:{spec.key}"


def line_key(prefix: str, spec: BucketSpec) -> str:
    return f"kvgate:{{{prefix}}}:line:{spec.key}"


def acquire_keys(prefix: str, specs: Sequence[BucketSpec]) -> list[str]:
    """KEYS of ``acquire.lua``: every bucket's TAT key, then every bucket's turn key, then every
    bucket's line key (one slot: they share the prefix's hash tag)."""
    tats = [bucket_key(prefix, spec) for spec in specs]
    return (
        tats
        + [turn_key(prefix, spec) for spec in specs]
        + [line_key(prefix, spec) for spec in specs]
    )


def acquire_args(
    specs: Sequence[BucketSpec],
    amounts: Sequence[float],
    now: _Arg,
    min_ttl_ms: int,
    max_wait_s: float = 0.0,
) -> list[_Arg]:
    """ARGV of ``acquire.lua``; ``now`` is seconds, or ``""`` for Redis time."""
    if len(amounts) != len(specs):
        raise ValueError("specs and amounts must have the same length")
    if not max_wait_s >= 0:
        raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
    args: list[_Arg] = [now, min_ttl_ms, max_wait_s]
    for spec, amount in zip(specs, amounts, strict=True):
        if not amount >= 0:
            raise ValueError(f"bucket {spec.key!r}: amount must be >= 0, got {amount}")
        args += (spec.rate_per_s, spec.burst, amount, 1 if spec.waits else 0)
    return args


def adjust_args(
    specs: Sequence[BucketSpec], deltas: Sequence[float], now: _Arg, min_ttl_ms: int
) -> list[_Arg]:
    """ARGV of ``adjust.lua``."""
    if len(deltas) != len(specs):
        raise ValueError("specs and deltas must have the same length")
    args: list[_Arg] = [now, min_ttl_ms]
    for spec, delta in zip(specs, deltas, strict=True):
        if math.isnan(delta):
            raise ValueError(f"bucket {spec.key!r}: delta must be a number")
        args += (spec.rate_per_s, delta)
    return args


def peek_args(specs: Sequence[BucketSpec], now: _Arg) -> list[_Arg]:
    """ARGV of ``peek.lua``."""
    args: list[_Arg] = [now]
    for spec in specs:
        args += (spec.rate_per_s, spec.burst)
    return args


def verdict_from_reply(reply: Sequence[_ReplyItem], count: int) -> Verdict:
    """The ``Verdict`` an ``acquire.lua`` reply encodes, equal to what ``try_take`` returns."""
    allowed = reply[0] == 1
    never = reply[1] == 1
    blocking = int(reply[2]) - 1 if reply[2] else None
    remaining = tuple(float(item) for item in reply[4 : 4 + count])
    reset_s = tuple(float(item) for item in reply[4 + count : 4 + 2 * count])
    if allowed:
        wait_s = float(reply[4 + 2 * count])
        return Verdict(allowed=True, remaining=remaining, reset_s=reset_s, wait_s=wait_s)
    return Verdict(
        allowed=False,
        retry_after_s=math.inf if never else float(reply[3]),
        never=never,
        blocking=blocking,
        remaining=remaining,
        reset_s=reset_s,
    )


class RedisLimitStore:
    """A ``LimitStore`` shared by gateway replicas through Redis at ``url``.

    ``timeout_s`` bounds connecting and each reply, so an unreachable Redis becomes a
    ``StoreError`` quickly enough for a fallback policy to act. A call whose connection broke is
    retried once on a fresh connection (a reply lost after the script ran could then charge twice:
    rare, and on the side of the limit).
    """

    def __init__(
        self,
        url: str,
        prefix: str = "kvgate",
        clock: Clock | None = None,
        *,
        timeout_s: float = 0.5,
    ) -> None:
        self._prefix = prefix
        self._clock = clock
        self._min_ttl_ms = 0 if clock is None else int(CALLER_CLOCK_MIN_TTL_S * 1000)
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
        )
        self._acquire = self._redis.register_script(script_source("acquire"))
        self._adjust = self._redis.register_script(script_source("adjust"))
        self._peek = self._redis.register_script(script_source("peek"))

    @property
    def prefix(self) -> str:
        return self._prefix

    def key(self, spec: BucketSpec) -> str:
        """The Redis key of a bucket."""
        return bucket_key(self._prefix, spec)

    @property
    def degraded(self) -> bool:
        return False  # it raises StoreError instead; FallbackLimitStore decides what then

    def acquire_now(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> None:
        return None

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        return False

    def _now(self) -> _Arg:
        return "" if self._clock is None else self._clock.now()

    async def acquire(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        if not specs:
            return Verdict(allowed=True)
        args = acquire_args(specs, amounts, self._now(), self._min_ttl_ms, max_wait_s)
        keys = acquire_keys(self._prefix, specs)
        try:
            reply: list[_ReplyItem] = await self._acquire(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"limit store: acquire failed: {exc}") from exc
        return verdict_from_reply(reply, len(specs))

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        if not any(deltas):
            return
        args = adjust_args(specs, deltas, self._now(), self._min_ttl_ms)
        keys = [self.key(spec) for spec in specs]
        try:
            await self._adjust(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"limit store: adjust failed: {exc}") from exc

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        if not specs:
            return ()
        keys = [self.key(spec) for spec in specs]
        try:
            reply: list[bytes] = await self._peek(keys=keys, args=peek_args(specs, self._now()))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"limit store: peek failed: {exc}") from exc
        return tuple(float(item) for item in reply)

    async def ping(self) -> None:
        """Check that Redis answers; raises ``StoreError`` when it does not."""
        try:
            await self._redis.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"limit store: ping failed: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()
