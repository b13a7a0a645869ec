"""Shared reservations against real Redis: ``reserve.lua``/``beat.lua`` are twins of
``gateway.core.shared.LeaseBook`` (same caller-given time, same answers), and two admitters
sharing one backend never plan more than it holds together."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.backends.admitter import Admitter, Lease
from gateway.backends.shared import SharedLink
from gateway.core.clock import FakeClock
from gateway.core.lifecycle import Health
from gateway.core.shared import LeaseBook
from gateway.store.reservations import (
    RedisReservations,
    backend_keys,
    beat_args,
    lease_script,
    reserve_args,
)
from tests.unit.test_admission import KVT, M, backend, config, ticket

pytestmark = [pytest.mark.integration, pytest.mark.redis]

LEASE = 5.0


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        c.close()


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "reserve", "beat"]),
        st.sampled_from("abc"),
        st.integers(0, 1500),
        st.floats(0, 3),
        st.integers(-2, 1),  # added to the sequence number: late and repeated writes too
        st.sampled_from([0, 0, 1, 2, 3]),  # demand (beat) or tenant weight (reserve)
        st.sampled_from([None, 0, 1, 2]),  # the best band waiting (beat) or the request's
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=100)
@given(ops=ops)
def test_lua_and_the_pure_twin_agree(
    client: redis.Redis, ops: list[tuple[str, str, int, float, int, int, int | None]]
) -> None:
    reserve = client.register_script(lease_script("reserve"))
    beat = client.register_script(lease_script("beat"))
    keys = backend_keys(f"diff-{uuid.uuid4().hex}", "http://gpu:8000")
    book = LeaseBook()
    now, seq, limit = 0.0, 10, 1000
    for op, replica, nbytes, dt, skew, w, band in ops:
        now += dt
        seq += 2
        s = seq + skew
        if op == "reserve":
            weight, mine = max(w, 1), band or 0
            args = reserve_args(now, replica, s, nbytes, LEASE, limit, weight, mine)
            got = reserve(keys=keys, args=args)
            want = book.reserve(replica, s, nbytes, limit, LEASE, now, weight, mine)
            assert (got[0] == 1, got[1]) == want
        else:
            args = beat_args(now, replica, s, nbytes, LEASE, w, limit, band)
            got = beat(keys=keys, args=args)
            assert got == book.beat(replica, s, nbytes, LEASE, now, w, limit, band)
    client.delete(*keys)


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[Admitter, Admitter, FakeClock]]:
    clock = FakeClock()
    prefix = f"pair-{uuid.uuid4().hex}"
    admitters = []
    for name in ("r1", "r2"):
        store = RedisReservations(redis_url, name, prefix=prefix, lease_s=LEASE, timeout_s=1.0)
        link = SharedLink(store, replicas=2, refresh_s=0.05)
        adm = Admitter(config(backend("http://gpu", 1000)), clock, shared=link)
        adm.observe_health(M, "http://gpu", Health.OK)
        admitters.append(adm)
    a, b = admitters
    try:
        yield a, b, clock
    finally:
        for adm in admitters:
            await adm.close()


async def test_two_replicas_never_hold_more_than_the_backend_together(
    pair: tuple[Admitter, Admitter, FakeClock],
) -> None:
    a, b, clock = pair
    first = await a.acquire(ticket(clock, 600))
    # b has not heard of a's bytes yet: it places, Redis refuses, and it waits for room
    waiting = asyncio.ensure_future(b.acquire(ticket(clock, 600)))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    snap = b.snapshot()[M]
    assert isinstance(snap, dict)
    assert snap["backends"][0]["reserved_bytes"] == 0
    first.release()
    await a._beat({"http://gpu"})  # publish now, as the release's own flush does
    await b._beat({"http://gpu"})  # b refreshes its figure of a
    second: Lease = await asyncio.wait_for(waiting, 5)
    assert second.reserved_bytes == 600 * KVT
    second.release()


async def test_a_redis_that_never_answers_costs_one_request_one_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # accepts, reads, never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = FakeClock()
    switches: list[bool] = []
    store = RedisReservations(f"redis://127.0.0.1:{port}/0", "r1", timeout_s=0.2)
    link = SharedLink(store, replicas=2, on_switch=switches.append)
    adm = Admitter(config(backend("http://gpu", 1000)), clock, shared=link)
    adm.observe_health(M, "http://gpu", Health.OK)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = await asyncio.wait_for(adm.acquire(ticket(clock, 400)), 5)
        assert loop.time() - t0 < 1.0  # one timeout (0.2 s), then decided on the share
        assert switches == [True]
        assert adm.shared_degraded
        # half of the backend is this replica's now: 400 tokens of 500 held, no room for more,
        # and no call to the silent Redis delays the decision
        waiting = asyncio.ensure_future(adm.acquire(ticket(clock, 400)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        snap = adm.snapshot()[M]
        assert isinstance(snap, dict)
        assert snap["queue_depth"] == 1
        first.release()
        lease = await asyncio.wait_for(waiting, 5)
        assert lease.reserved_bytes == 400 * KVT
        lease.release()
    finally:
        await adm.close()
        server.close()
