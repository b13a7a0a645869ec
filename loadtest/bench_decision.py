"""Micro-benchmark of the per-request limit decision: parse the body, estimate its cost, take from
three buckets and settle them (an acquire and an adjust), on the memory store and on Redis; and of
admission: a placement and its release on an idle backend, and a release's queue pump while 2000
requests wait that cannot fit.

Prints microseconds per decision (median of ``--runs`` runs) and the ratio to a bare dict lookup
measured in the same process, so figures from different machines can be compared.

    python -m loadtest.bench_decision [--runs 5] [--n 20000] [--redis-url URL | --no-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import redis.asyncio as aioredis

from gateway.core.admission import Admission, Placement, Queued
from gateway.core.backend import BackendConfig, Signals
from gateway.core.bucket import BucketSpec
from gateway.core.clock import FakeClock, MonotonicClock
from gateway.core.cost import DTYPE_BYTES, ModelProfile, estimate
from gateway.core.lifecycle import Health
from gateway.core.pool import AdmissionConfig, ModelPool, Ticket
from gateway.core.queueing import QueueConfig
from gateway.core.types import Priority, Unit
from gateway.errors import StoreError
from gateway.proxy.apis.routes import parse_request
from gateway.store.base import LimitStore
from gateway.store.memory import MemoryLimitStore
from gateway.store.redis import RedisLimitStore

PATH = "/v1/chat/completions"
PROFILE = ModelProfile(
    layers=32,
    kv_heads=8,
    head_dim=128,
    dtype_bytes=DTYPE_BYTES["bf16"],
    block_size=16,
    context_tokens=131072,
    default_max_tokens=1024,
    chars_per_token=4.0,
    prefill_tokens_per_s=8000.0,
    decode_tokens_per_s=40.0,
    price_input_per_mtok=0.10,
    price_output_per_mtok=0.20,
)
# Rates high enough that every take passes, so each decision writes state (the costly path).
SPECS = (
    BucketSpec("tenant:acme:requests", Unit.REQUESTS, rate_per_s=1e9, burst=1e9),
    BucketSpec("tenant:acme:tokens", Unit.TOKENS, rate_per_s=1e12, burst=1e12),
    BucketSpec("model:llama:requests", Unit.REQUESTS, rate_per_s=1e9, burst=1e9),
)


def sample_body() -> bytes:
    """A typical chat request: system prompt, two turns, about 2 KB of text, sampling options."""
    turn = "Summarise the following passage in two sentences. " * 12
    return msgspec.json.encode(
        {
            "model": "llama-3.1-8b",
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": turn},
                {"role": "assistant", "content": "Here is a summary. " * 10},
                {"role": "user", "content": turn},
            ],
            "max_tokens": 256,
            "temperature": 0.7,
            "top_p": 0.9,
            "stream": True,
        }
    )


def median_us(runs: int, n: int, once: Callable[[int], None]) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        once(n)
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


async def median_us_async(runs: int, n: int, once: Callable[[int], Awaitable[None]]) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await once(n)
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


def dict_lookup(n: int) -> None:
    table = {spec.key: 1.0 for spec in SPECS}
    key = SPECS[1].key
    for _ in range(n):
        table[key]


def parse_only(body: bytes) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            parse_request(body, PATH)

    return run


def parse_and_estimate(body: bytes) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            estimate(parse_request(body, PATH), PROFILE)

    return run


def decisions(store: LimitStore, body: bytes) -> Callable[[int], Awaitable[None]]:
    """Each iteration: parse, estimate, a 3-bucket acquire, and an adjust settling the tokens."""

    async def run(n: int) -> None:
        for _ in range(n):
            cost = estimate(parse_request(body, PATH), PROFILE)
            amounts = [cost.amount(spec.unit) for spec in SPECS]
            verdict = await store.acquire(SPECS, amounts)
            if not verdict.allowed:
                raise RuntimeError("the benchmark's buckets should never refuse")
            await store.adjust(SPECS, [0.0, -0.5 * amounts[1], 0.0])

    return run


def _admission(kv_bytes: int, waiting: int) -> tuple[Admission, FakeClock]:
    """One backend of ``kv_bytes``; with ``waiting`` > 0 it is filled and that many requests
    too large for what is left queue behind it."""
    clock = FakeClock()
    backend = BackendConfig(url="http://b", signals=Signals.NONE, kv_capacity_bytes=kv_bytes)
    queue = QueueConfig(max_wait_s=1e9, max_depth=waiting + 1, target_delay_s=1e9)
    adm = Admission(AdmissionConfig(models=(ModelPool("m", 1024, (backend,)),), queue=queue), 0.0)
    adm.observe_health("m", "http://b", Health.OK, clock.now())
    while waiting and isinstance(adm.offer(_ticket(clock, 1000), clock.now()), Placement):
        pass
    for i in range(waiting):
        queued = adm.offer(_ticket(clock, 50_000, tenant=f"t{i % 20}"), clock.now())
        if not isinstance(queued, Queued):
            raise RuntimeError(f"the benchmark's large requests should queue, got {queued}")
    adm.take_events()
    return adm, clock


def _ticket(clock: FakeClock, tokens: int, tenant: str = "t") -> Ticket:
    return Ticket(tenant, "m", Priority.STANDARD, 1.0, tokens // 2, tokens // 2, 1024, 1e9)


def place_and_release(n: int) -> None:
    adm, clock = _admission(1 << 40, waiting=0)
    for _ in range(n):
        placement = adm.offer(_ticket(clock, 1000), clock.now())
        assert isinstance(placement, Placement)
        adm.release(placement.lease_id, output_tokens=16, ttft_s=0.01, failure=None, now=1.0)


def pump_while_full(n: int) -> None:
    adm, clock = _admission(100_500 * 1024, waiting=2000)  # 500 tokens stay free
    for _ in range(n):
        adm.tick(clock.now())


async def bench(args: argparse.Namespace) -> None:
    body = sample_body()
    baseline = median_us(args.runs, args.n * 10, dict_lookup)
    rows = [("bare dict lookup (baseline)", baseline)]
    rows.append(("parse body", median_us(args.runs, args.n, parse_only(body))))
    rows.append(("parse + estimate", median_us(args.runs, args.n, parse_and_estimate(body))))
    rows.append(("admission: place + release", median_us(args.runs, args.n, place_and_release)))
    rows.append(
        ("admission: pump, 2000 waiting", median_us(args.runs, args.n // 10, pump_while_full))
    )
    memory = MemoryLimitStore(MonotonicClock())
    rows.append(
        (
            "decision, memory store",
            await median_us_async(args.runs, args.n, decisions(memory, body)),
        )
    )
    if not args.no_redis:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        store = RedisLimitStore(args.redis_url, prefix=prefix)
        try:
            n = max(1, args.n // 10)
            rows.append(
                (
                    "decision, Redis store",
                    await median_us_async(args.runs, n, decisions(store, body)),
                )
            )
        except StoreError as exc:
            print(f"(Redis skipped: {exc})")
        finally:
            await store.close()
            client = aioredis.Redis.from_url(args.redis_url)
            keys = [k async for k in client.scan_iter(match=f"kvgate:{{{prefix}}}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    print(f"body {len(body)} B, {len(SPECS)} buckets, median of {args.runs} runs")
    print(f"{'step':<30} {'µs/op':>10} {'x dict lookup':>14}")
    for name, us in rows:
        print(f"{name:<30} {us:>10.2f} {us / baseline:>14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000, help="decisions per run (Redis: n/10)")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
    )
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(bench(args))
    else:
        uvloop.run(bench(args))


if __name__ == "__main__":
    main()
