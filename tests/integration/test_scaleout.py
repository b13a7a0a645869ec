"""Three gateway processes in front of one simulated contiguous backend, sharing admission
through a Redis of their own (``loadtest.replicas.Fleet``): together they never hold more than
its usable KV memory, a replica killed with SIGKILL frees its reservations within the lease, and
a Redis killed and restarted mid-run costs no request more than a bounded wait; a tenant's
limits hold across them as one global limit, and weights and priority bands across them as on
one."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.store.reservations import backend_keys
from loadtest.replicas import Fleet, bands, drive, limits, weights

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

CLIENTS = 24  # about three times what the backend holds at once
SECONDS = 8.0


async def _held(fleet: Fleet) -> dict[bytes, bytes]:
    client = aioredis.Redis.from_url(fleet.redis_url)
    try:
        held = backend_keys(fleet.prefix, f"http://127.0.0.1:{fleet.sim_port}")[0]
        return await client.hgetall(held)  # type: ignore[no-any-return]
    finally:
        await client.aclose()


async def _metric(url: str, series: str) -> float | None:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


async def test_three_replicas_never_overfill_the_backend_and_serve_as_much_as_one() -> None:
    async with Fleet(1) as one:
        single = await drive(one.urls, clients=CLIENTS, duration_s=SECONDS)
        assert await one.oom_errors() == 0
    async with Fleet(3) as three:
        fleet = await drive(three.urls, clients=CLIENTS, duration_s=SECONDS)
        assert await three.oom_errors() == 0
    assert fleet.oom == fleet.failed == fleet.other == 0, fleet
    # one shared machine runs all of it: a margin for its noise, not for the design
    assert fleet.output_tokens >= 0.95 * single.output_tokens, (single, fleet)


async def test_a_killed_replica_frees_its_reservations_within_the_lease() -> None:
    async with Fleet(3, lease="2s") as fleet:
        load = asyncio.ensure_future(drive(fleet.urls, clients=CLIENTS, duration_s=12.0))
        victim = fleet.gateways[0]
        assert victim is not None
        mine = f":{victim.pid}:".encode()
        async with asyncio.timeout(8):  # until the victim holds something to free
            while not any(mine in r and int(n) > 0 for r, n in (await _held(fleet)).items()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await fleet.kill_gateway(0)
        killed = time.monotonic()
        while any(mine in r for r in await _held(fleet)):
            assert time.monotonic() - killed < 2.0 + 0.5, "the dead replica's bytes stayed"
            await asyncio.sleep(0.05)
        tally = await load
        assert tally.oom == 0
        assert await fleet.oom_errors() == 0


async def test_redis_lost_and_back_mid_run_sheds_to_shares_and_returns() -> None:
    async with Fleet(3) as fleet:
        load = asyncio.ensure_future(drive(fleet.urls, clients=CLIENTS, duration_s=12.0))
        await asyncio.sleep(3.0)
        await fleet.stop_redis()
        await asyncio.sleep(2.0)
        for url in fleet.admin_urls:
            assert await _metric(url, "kvgate_shared_admission_degraded") == 1
        await asyncio.sleep(2.0)
        await fleet.start_redis()
        await asyncio.sleep(2.0)
        for url in fleet.admin_urls:
            assert await _metric(url, "kvgate_shared_admission_degraded") == 0
            # one switch each way, or more where a reply on this loaded machine took longer
            # than the 100 ms timeout: every one is counted, and the last one is back
            switches = [
                await _metric(url, f'kvgate_shared_admission_switches_total{{to="{to}"}}')
                for to in ("degraded", "shared")
            ]
            assert switches[0] is not None
            assert switches[0] >= 1
            assert switches[0] == switches[1]
        assert len(await _held(fleet)) == 3  # every replica published its figure again
        tally = await load
    # nobody waited on the dead Redis: every request ended within its queue's bound
    assert tally.failed == tally.other == tally.oom == 0, tally
    assert max(tally.latencies) < 30.0
    assert tally.ok > 0


async def test_weights_hold_across_replicas() -> None:
    # a tenant of weight 2 on one replica and one of weight 1 on another, both overloading
    heavy, light = await weights(2, clients=16, duration_s=20.0)
    assert heavy.oom == light.oom == 0
    # 10% is the goal (measured 1.87:1 over 15 s); output lengths are random, so a run this
    # short needs a wider band not to fail on their draw alone
    assert 1.7 <= heavy.output_tokens / light.output_tokens <= 2.3, (heavy, light)


async def test_limits_hold_across_replicas_as_one_global_limit() -> None:
    for check in await limits(3, clients=16, duration_s=SECONDS):
        assert 0.95 <= check.ratio <= 1.05, check.line()


async def test_priority_bands_hold_across_replicas() -> None:
    # a critical tenant on one replica, a sheddable one on another, both overloading: the
    # sheddable one gets what the critical one leaves, as on one replica (measured 100% over
    # 15 s, 57% when bands were per replica). Before the critical replica first publishes
    # what waits there, the sheddable one may fill the backend once (nothing is preempted):
    # in a run this short on a loaded machine that start is up to a tenth of the tokens.
    critical, sheddable = await bands(2, clients=16, duration_s=SECONDS)
    assert critical.oom == sheddable.oom == 0
    served = critical.output_tokens + sheddable.output_tokens
    assert critical.output_tokens >= 0.8 * served, (critical, sheddable)
