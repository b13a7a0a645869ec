"""One contract for every LimitStore: the in-process store and Redis (real server, Lua scripts).

Time is a FakeClock passed to both stores, so every expectation is exact; one test also runs the
Redis store on Redis's own clock. Each Redis test uses a fresh key prefix and deletes its keys.
"""

from __future__ import annotations

import asyncio
import math
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.core.bucket import BucketSpec
from gateway.core.clock import FakeClock
from gateway.core.types import Unit
from gateway.store.base import LimitStore, StoreError
from gateway.store.fallback import FallbackLimitStore, OnError
from gateway.store.memory import MemoryLimitStore
from gateway.store.redis import RedisLimitStore

pytestmark = pytest.mark.integration

TOKENS = BucketSpec("tenant:acme:tokens", Unit.TOKENS, rate_per_s=10.0, burst=100.0)
REQUESTS = BucketSpec("tenant:acme:requests", Unit.REQUESTS, rate_per_s=1.0, burst=2.0)
MODEL = BucketSpec("model:llama:requests", Unit.REQUESTS, rate_per_s=100.0, burst=5.0)
WAITING = BucketSpec(
    "tenant:acme:tokens:wait", Unit.TOKENS, rate_per_s=10.0, burst=100.0, waits=True
)


async def delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"kvgate:{{{prefix}}}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def stores(
    request: pytest.FixtureRequest, prefix: str
) -> AsyncIterator[tuple[LimitStore, LimitStore, FakeClock]]:
    """Two handles on one bucket state (two gateway replicas), and the clock they both read."""
    clock = FakeClock()
    if request.param == "memory":
        memory = MemoryLimitStore(clock)
        yield memory, memory, clock
        return
    url: str = request.getfixturevalue("redis_url")
    # a reachable Redis on a loaded machine may take longer than the production timeout
    first = RedisLimitStore(url, prefix=prefix, clock=clock, timeout_s=5.0)
    second = RedisLimitStore(url, prefix=prefix, clock=clock, timeout_s=5.0)
    try:
        yield first, second, clock
    finally:
        await first.close()
        await second.close()
        await delete_prefix(url, prefix)


async def test_burst_then_exact_retry_after(
    stores: tuple[LimitStore, LimitStore, FakeClock],
) -> None:
    store, _, clock = stores
    assert (await store.acquire([TOKENS], [100.0])).allowed
    refused = await store.acquire([TOKENS], [30.0])
    assert not refused.allowed
    assert refused.blocking == 0
    assert refused.retry_after_s == pytest.approx(3.0)
    assert refused.remaining == (0.0,)
    assert refused.reset_s == pytest.approx((10.0,))
    clock.advance(refused.retry_after_s - 0.01)
    assert not (await store.acquire([TOKENS], [30.0])).allowed
    clock.advance(0.01)
    passed = await store.acquire([TOKENS], [30.0])
    assert passed.allowed
    assert passed.remaining == pytest.approx((0.0,))


async def test_all_or_nothing_across_buckets(
    stores: tuple[LimitStore, LimitStore, FakeClock],
) -> None:
    store, _, _ = stores
    specs = [TOKENS, REQUESTS, MODEL]
    assert (await store.acquire(specs, [10.0, 1.0, 1.0])).allowed
    before = await store.peek(specs)
    assert before == pytest.approx((90.0, 1.0, 4.0))
    refused = await store.acquire(specs, [10.0, 2.0, 1.0])
    assert not refused.allowed
    assert refused.blocking == 1
    assert await store.peek(specs) == before


async def test_more_than_a_burst_is_never(stores: tuple[LimitStore, LimitStore, FakeClock]) -> None:
    store, _, _ = stores
    verdict = await store.acquire([REQUESTS, TOKENS], [1.0, 150.0])
    assert verdict.never
    assert verdict.blocking == 1
    assert verdict.retry_after_s == math.inf
    assert await store.peek([REQUESTS, TOKENS]) == (2.0, 100.0)


async def test_settlement_refunds_and_overruns(
    stores: tuple[LimitStore, LimitStore, FakeClock],
) -> None:
    store, _, _ = stores
    assert (await store.acquire([TOKENS], [80.0])).allowed
    await store.adjust([TOKENS], [-50.0])
    assert await store.peek([TOKENS]) == pytest.approx((70.0,))
    await store.adjust([TOKENS], [-500.0])
    assert await store.peek([TOKENS]) == (100.0,)  # never above full
    await store.adjust([TOKENS], [130.0])
    assert await store.peek([TOKENS]) == pytest.approx((-30.0,))
    in_debt = await store.acquire([TOKENS], [1.0])
    assert not in_debt.allowed
    assert in_debt.retry_after_s == pytest.approx(3.1)
    assert (await store.acquire([TOKENS], [0.0])).allowed


async def test_waiting_turns_are_fifo_across_replicas_and_refunds(
    stores: tuple[LimitStore, LimitStore, FakeClock],
) -> None:
    first, second, clock = stores
    assert (await first.acquire([WAITING], [100.0], max_wait_s=30.0)).wait_s == 0.0
    early = await first.acquire([WAITING], [100.0], max_wait_s=30.0)
    assert early.allowed
    assert early.wait_s == pytest.approx(10.0)  # goes at 10 s
    clock.advance(1.0)
    await second.adjust([WAITING], [-80.0])  # the first request used 20 of its 100
    # the other replica sees the earlier turn: a small take goes with it, not 7 s before it
    later = await second.acquire([WAITING], [10.0], max_wait_s=30.0)
    assert later.allowed
    assert later.wait_s == pytest.approx(9.0)
    # one whose turn would begin after its budget is refused at once, told when it is granted
    short = await first.acquire([WAITING], [10.0], max_wait_s=2.0)
    assert not short.allowed
    assert short.retry_after_s == pytest.approx(7.0)  # its turn begins at 10 s
    clock.advance(short.retry_after_s)
    assert (await first.acquire([WAITING], [10.0], max_wait_s=2.0)).allowed


async def test_refused_waiting_takes_are_told_apart_across_replicas(
    stores: tuple[LimitStore, LimitStore, FakeClock],
) -> None:
    first, second, clock = stores
    t0 = clock.now()
    assert (await first.acquire([WAITING], [100.0], max_wait_s=30.0)).allowed
    assert (await first.acquire([WAITING], [100.0], max_wait_s=30.0)).wait_s == pytest.approx(10)
    # the queue has room for a take that may wait 2 s in 8 s: the first refused is told 8 s,
    # each later one the end of the place of the one before (its refill time), whatever replica
    told = []
    for replica, amount in ((first, 20.0), (second, 30.0), (first, 10.0)):
        refused = await replica.acquire([WAITING], [amount], max_wait_s=2.0)
        assert not refused.allowed
        told.append(refused.retry_after_s)
    assert told == pytest.approx([8.0, 10.0, 13.0])

    async def back_at(at: float, replica: LimitStore, amount: float) -> None:
        clock.advance(t0 + at - clock.now())
        assert (await replica.acquire([WAITING], [amount], max_wait_s=2.0)).allowed

    # each that comes back when told is granted its turn: none of them is refused again
    await back_at(8.0, second, 20.0)
    # a new one now would find room at 10 s, by the queue alone, with the second refused take:
    # it is told 14 s, after the last place
    clock.advance(0.5)
    new = await second.acquire([WAITING], [10.0], max_wait_s=2.0)
    assert new.retry_after_s == pytest.approx(5.5)
    await back_at(10.0, first, 30.0)
    await back_at(13.0, second, 10.0)
    await back_at(14.0, first, 10.0)


async def test_replicas_share_one_state_atomically(
    stores: tuple[LimitStore, LimitStore, FakeClock],
) -> None:
    first, second, _ = stores
    specs = [MODEL, REQUESTS]
    verdicts = await asyncio.gather(
        *(replica.acquire(specs, [1.0, 0.0]) for replica in [first, second] * 10)
    )
    assert sum(v.allowed for v in verdicts) == 5  # MODEL's burst, not 5 per replica
    assert (
        await first.peek(specs) == await second.peek(specs) == pytest.approx((0.0, 2.0), abs=1e-9)
    )


async def test_unknown_buckets_are_full_and_no_specs_pass(
    stores: tuple[LimitStore, LimitStore, FakeClock],
) -> None:
    store, _, _ = stores
    assert await store.peek([TOKENS, MODEL]) == (100.0, 5.0)
    assert await store.peek([]) == ()
    assert (await store.acquire([], [])).allowed
    await store.adjust([], [])


async def test_bad_amounts_are_refused(stores: tuple[LimitStore, LimitStore, FakeClock]) -> None:
    store, _, _ = stores
    with pytest.raises(ValueError, match="amount"):
        await store.acquire([TOKENS], [-1.0])
    with pytest.raises(ValueError, match="same length"):
        await store.adjust([TOKENS, MODEL], [1.0])


@pytest.mark.redis
async def test_redis_time_keys_share_a_slot_and_expire_when_full(
    redis_url: str, prefix: str
) -> None:
    store = RedisLimitStore(redis_url, prefix=prefix, timeout_s=5.0)
    client = aioredis.Redis.from_url(redis_url)
    # full again 100 s after a take: the keys outlive any stall of a loaded machine
    model = BucketSpec("model:llama:requests", Unit.REQUESTS, rate_per_s=0.01, burst=5.0)
    try:
        assert (await store.acquire([REQUESTS, model], [2.0, 1.0])).allowed
        refused = await store.acquire([REQUESTS], [1.0])
        assert not refused.allowed
        assert 0 < refused.retry_after_s <= 1.0
        keys = sorted([k.decode() async for k in client.scan_iter(match=f"kvgate:{{{prefix}}}:*")])
        assert keys == [store.key(model), store.key(REQUESTS)]
        assert all(f"{{{prefix}}}" in key for key in keys)  # one hash tag: one Cluster slot
        ttl_ms = await client.pttl(store.key(model))
        assert 0 < ttl_ms <= 100_001  # full again 100 s after the take, plus 1 ms of rounding
        await store.adjust([REQUESTS, model], [-2.0, -1.0])
        assert await client.exists(store.key(REQUESTS), store.key(model)) == 0
        # a take that waits books its turn beside the TAT, in the slot, until the turn comes
        waiting = BucketSpec(
            "tenant:acme:wait", Unit.TOKENS, rate_per_s=0.01, burst=1.0, waits=True
        )
        assert (await store.acquire([waiting], [1.0], max_wait_s=200.0)).wait_s == 0.0
        assert (await store.acquire([waiting], [1.0], max_wait_s=200.0)).wait_s > 99.0
        turn = f"kvgate:{{{prefix}}}:turn:{waiting.key}"
        assert 99_000 < await client.pttl(turn) <= 100_001
        # a refused one books its place in the line of retries, in the slot, until it ends:
        # told to come back in 50 s, its place lasts its 50 s of refill
        refused = await store.acquire([waiting], [0.5], max_wait_s=50.0)
        assert refused.retry_after_s == pytest.approx(50.0, abs=1.0)
        line = f"kvgate:{{{prefix}}}:line:{waiting.key}"
        assert 98_000 < await client.pttl(line) <= 100_001
    finally:
        await client.aclose()
        await store.close()
        await delete_prefix(redis_url, prefix)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_redis_outage_raises_store_error() -> None:
    store = RedisLimitStore(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.5)
    try:
        with pytest.raises(StoreError, match="acquire"):
            await store.acquire([TOKENS], [1.0])
        with pytest.raises(StoreError, match="adjust"):
            await store.adjust([TOKENS], [-1.0])
        with pytest.raises(StoreError, match="peek"):
            await store.peek([TOKENS])
    finally:
        await store.close()


@pytest.mark.parametrize("on_error", ["local", "allow", "deny"])
async def test_redis_outage_follows_on_error(on_error: OnError) -> None:
    clock = FakeClock()
    primary = RedisLimitStore(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.5)
    store = FallbackLimitStore(primary, MemoryLimitStore(clock), on_error, clock=clock)
    try:
        verdicts = [await store.acquire([REQUESTS], [1.0]) for _ in range(3)]
        assert store.degraded
        assert store.failures == 1  # resting during the back-off, not retried per request
        if on_error == "local":
            assert [v.allowed for v in verdicts] == [True, True, False]
            assert not any(v.store_error for v in verdicts)
        elif on_error == "allow":
            assert all(v.allowed and v.store_error for v in verdicts)
        else:
            assert not any(v.allowed for v in verdicts)
            assert all(v.store_error for v in verdicts)
    finally:
        await store.close()


@pytest.mark.redis
async def test_fallback_recovers_when_redis_answers(redis_url: str, prefix: str) -> None:
    clock = FakeClock()
    primary = RedisLimitStore(redis_url, prefix=prefix, clock=clock, timeout_s=5.0)
    store = FallbackLimitStore(primary, MemoryLimitStore(clock), "deny", clock=clock)
    try:
        assert (await store.acquire([REQUESTS], [1.0])).allowed
        assert not store.degraded
    finally:
        await store.close()
        await delete_prefix(redis_url, prefix)
