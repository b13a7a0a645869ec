"""The fallback store: each on_error mode, back-off before retrying the primary, recovery."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.clock import FakeClock
from gateway.core.types import Unit
from gateway.store.base import StoreError
from gateway.store.fallback import FallbackLimitStore, OnError
from gateway.store.memory import MemoryLimitStore

SPECS = (BucketSpec("t:a:requests", Unit.REQUESTS, rate_per_s=1.0, burst=2.0),)


class FlakyStore:
    """A primary that is a real memory store, or fails every call while ``down``."""

    def __init__(self, clock: FakeClock) -> None:
        self.inner = MemoryLimitStore(clock)
        self.down = False
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def _enter(self) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreError("primary is down")

    async def acquire(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        await self._enter()
        return await self.inner.acquire(specs, amounts, max_wait_s)

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        await self._enter()
        await self.inner.adjust(specs, deltas)

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        await self._enter()
        return await self.inner.peek(specs)

    async def close(self) -> None:
        await self.inner.close()


def build(on_error: OnError) -> tuple[FakeClock, FlakyStore, MemoryLimitStore, FallbackLimitStore]:
    clock = FakeClock()
    primary = FlakyStore(clock)
    local = MemoryLimitStore(clock)
    store = FallbackLimitStore(
        primary, local, on_error, clock=clock, backoff_s=1.0, max_backoff_s=4.0
    )
    return clock, primary, local, store


async def test_healthy_primary_decides_everything() -> None:
    _, primary, local, store = build("deny")
    assert (await store.acquire(SPECS, [2.0])).allowed
    refused = await store.acquire(SPECS, [1.0])
    assert not refused.allowed
    assert not refused.store_error
    assert await store.peek(SPECS) == (0.0,)
    assert len(local) == 0
    assert primary.calls == 3
    assert not store.degraded


async def test_local_mode_decides_with_the_in_process_store() -> None:
    _, primary, local, store = build("local")
    primary.down = True
    first = await store.acquire(SPECS, [2.0])
    assert first.allowed
    assert not first.store_error
    assert store.degraded
    assert store.failures == 1
    second = await store.acquire(SPECS, [1.0])
    assert not second.allowed  # the local bucket is empty now
    assert second.retry_after_s == pytest.approx(1.0)
    await store.adjust(SPECS, [-1.0])
    assert await store.peek(SPECS) == (1.0,)
    assert local.peek_now(SPECS) == (1.0,)


async def test_local_mode_keeps_this_gateways_share_of_each_bucket() -> None:
    # Three replicas fall back at once: each may spend a third of the shared limit.
    clock = FakeClock()
    primary = FlakyStore(clock)
    specs = (BucketSpec("t:a:tokens", Unit.TOKENS, rate_per_s=30.0, burst=300.0),)
    store = FallbackLimitStore(primary, MemoryLimitStore(clock), "local", clock=clock, replicas=3)
    primary.down = True
    assert (await store.acquire(specs, [100.0])).allowed
    refused = await store.acquire(specs, [1.0])
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.1)  # refills at 30/3 per second
    assert await store.peek(specs) == (0.0,)
    await store.adjust(specs, [-50.0])
    assert await store.peek(specs) == (50.0,)
    too_large = await store.acquire(specs, [150.0])
    assert too_large.never  # above this gateway's share of the burst
    primary.down = False
    clock.advance(1.0)
    assert (await store.acquire(specs, [300.0])).allowed  # recovered: the whole shared bucket


async def test_allow_mode_lets_everything_through_marked() -> None:
    _, primary, _, store = build("allow")
    primary.down = True
    for _ in range(5):
        verdict = await store.acquire(SPECS, [2.0])
        assert verdict.allowed
        assert verdict.store_error
    with pytest.raises(StoreError):
        await store.peek(SPECS)


async def test_deny_mode_refuses_with_the_time_until_the_next_attempt() -> None:
    clock, primary, _, store = build("deny")
    primary.down = True
    verdict = await store.acquire(SPECS, [1.0])
    assert not verdict.allowed
    assert verdict.store_error
    assert not verdict.never
    assert verdict.retry_after_s == pytest.approx(1.0)
    clock.advance(0.25)
    assert (await store.acquire(SPECS, [1.0])).retry_after_s == pytest.approx(1.0)


async def test_primary_rests_during_back_off_then_recovers() -> None:
    clock, primary, _, store = build("deny")
    primary.down = True
    await store.acquire(SPECS, [1.0])
    assert primary.calls == 1
    for _ in range(10):
        await store.acquire(SPECS, [1.0])
    await store.adjust(SPECS, [-1.0])
    assert primary.calls == 1  # not retried on every request while down
    clock.advance(1.0)
    await store.acquire(SPECS, [1.0])
    assert primary.calls == 2  # one probe after the back-off; still down, back-off doubles
    clock.advance(1.5)
    await store.acquire(SPECS, [1.0])
    assert primary.calls == 2
    clock.advance(0.5)
    primary.down = False
    recovered = await store.acquire(SPECS, [1.0])
    assert primary.calls == 3
    assert recovered.allowed
    assert not recovered.store_error
    assert not store.degraded
    assert store.failures == 2


async def test_back_off_is_capped_and_resets_after_recovery() -> None:
    clock, primary, _, store = build("deny")
    primary.down = True
    for _ in range(6):
        await store.acquire(SPECS, [1.0])
        clock.advance(4.0)  # the cap: every wait is at most 4 s, so each loop probes once
    assert primary.calls == 6
    primary.down = False
    await store.acquire(SPECS, [1.0])
    primary.down = True
    await store.acquire(SPECS, [1.0])
    assert (await store.acquire(SPECS, [1.0])).retry_after_s == pytest.approx(1.0)


async def test_only_one_probe_at_a_time() -> None:
    clock, primary, _, store = build("allow")
    primary.down = True
    await store.acquire(SPECS, [1.0])
    clock.advance(1.0)
    primary.gate = asyncio.Event()
    probe = asyncio.create_task(store.acquire(SPECS, [1.0]))
    await asyncio.sleep(0)
    others = [await store.acquire(SPECS, [1.0]) for _ in range(3)]
    assert all(v.store_error for v in others)
    assert primary.calls == 2
    primary.down = False
    primary.gate.set()
    assert not (await probe).store_error
    assert not store.degraded


async def test_a_cancelled_probe_does_not_block_later_probes() -> None:
    clock, primary, _, store = build("allow")
    primary.down = True
    await store.acquire(SPECS, [1.0])
    clock.advance(1.0)
    primary.gate = asyncio.Event()
    probe = asyncio.create_task(store.acquire(SPECS, [1.0]))
    await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    primary.gate = None
    primary.down = False
    assert not (await store.acquire(SPECS, [1.0])).store_error


async def test_calls_in_flight_at_the_outage_do_not_stack_the_back_off() -> None:
    clock, primary, _, store = build("deny")
    primary.gate = asyncio.Event()
    primary.down = True
    calls = [asyncio.create_task(store.acquire(SPECS, [1.0])) for _ in range(5)]
    await asyncio.sleep(0)
    primary.gate.set()
    await asyncio.gather(*calls)
    primary.gate = None
    assert store.failures == 5
    clock.advance(1.0)  # the first back-off, not 1 + 2 + 4 ...
    primary.down = False
    assert (await store.acquire(SPECS, [1.0])).allowed


def test_configuration_is_checked() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="on_error"):
        FallbackLimitStore(MemoryLimitStore(clock), MemoryLimitStore(clock), "maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backoff"):
        FallbackLimitStore(MemoryLimitStore(clock), MemoryLimitStore(clock), "deny", backoff_s=0.0)
    with pytest.raises(ValueError, match="replicas"):
        FallbackLimitStore(MemoryLimitStore(clock), MemoryLimitStore(clock), "local", replicas=0)
