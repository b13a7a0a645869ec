"""Shared admission (``admission.shared``, one Lua call per placement and per release through
Redis) against the in-process one: decisions per second and the latency a placement adds.

One ``Admitter`` over one idle backend large enough that nothing ever waits; ``--tasks``
concurrent tasks acquire and release as fast as they can for ``--seconds``. A decision is one
acquire plus its release. Latency: the time of one acquire, measured with nothing else running.

    python -m loadtest.bench_shared [--redis-url URL] [--seconds 5] [--tasks 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from aiohttp import web

from gateway.backends.admitter import Admitter
from gateway.backends.shared import SharedLink
from gateway.core.backend import BackendConfig, MemoryKind, Signals
from gateway.core.clock import MonotonicClock
from gateway.core.lifecycle import Health
from gateway.core.pool import AdmissionConfig, ModelPool, Ticket
from gateway.core.types import Priority
from gateway.store.reservations import RedisReservations

KVT = 131072


def _admitter(url: str, redis_url: str | None) -> Admitter:
    clock = MonotonicClock()
    backend = BackendConfig(
        url=url, signals=Signals.NONE, kv_capacity_bytes=2**50, memory=MemoryKind.CONTIGUOUS,
        warmup_s=0.0,
    )  # fmt: skip
    config = AdmissionConfig(models=(ModelPool("m", KVT, (backend,)),))
    shared = None
    if redis_url is not None:
        store = RedisReservations(redis_url, f"bench-{uuid.uuid4().hex[:8]}", timeout_s=1.0)
        shared = SharedLink(store, replicas=1, refresh_s=0.25)
    adm = Admitter(config, clock, shared=shared)
    adm.observe_health("m", url, Health.OK)
    return adm


def _ticket(clock: MonotonicClock) -> Ticket:
    return Ticket(
        tenant="t", model="m", priority=Priority.STANDARD, weight=1.0, prompt_tokens=500,
        max_output_tokens=500, kv_bytes_per_token=KVT, deadline=clock.now() + 60.0,
    )  # fmt: skip


async def _rate(adm: Admitter, seconds: float, tasks: int) -> float:
    clock = MonotonicClock()
    done = 0
    end = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < end:
            lease = await adm.acquire(_ticket(clock))
            lease.release()
            done += 1

    await asyncio.gather(*(loop() for _ in range(tasks)))
    return done / seconds


async def _latency_us(adm: Admitter, n: int) -> float:
    clock = MonotonicClock()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        lease = await adm.acquire(_ticket(clock))
        times.append(time.perf_counter() - t0)
        lease.release()
        await asyncio.sleep(0)  # let the release's publication go out
    return statistics.median(times) * 1e6


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _main(args: argparse.Namespace) -> None:
    health = web.Application()
    health.router.add_get("/health", _health)
    runner = web.AppRunner(health)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend = f"http://127.0.0.1:{runner.addresses[0][1]}"  # answers the monitor's probes
    rows = []
    for name, url in (("in-process", None), ("shared (Redis)", args.redis_url)):
        rates, lats = [], []
        for _ in range(args.runs):
            adm = _admitter(backend, url)
            await adm.start()  # monitor and heartbeat run, as in a gateway
            try:
                lats.append(await _latency_us(adm, 2000))
                rates.append(await _rate(adm, args.seconds, args.tasks))
            finally:
                await adm.close()
        rows.append((name, statistics.median(rates), statistics.median(lats)))
    await runner.cleanup()
    print(f"\nmedians of {args.runs} runs, {args.tasks} concurrent tasks, one process\n")
    print("| admission | decisions/s | acquire latency µs (median, idle) |")
    print("|---|---:|---:|")
    for name, rate, lat in rows:
        print(f"| {name} | {rate:.0f} | {lat:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(args))
    else:
        uvloop.run(_main(args))


if __name__ == "__main__":
    main()
