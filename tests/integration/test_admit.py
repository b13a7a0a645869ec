"""The async admission driver with real stub backends on 127.0.0.1 whose /health and /metrics
the test controls, and fast probes. The core's clock is a FakeClock the test moves, so warm-up
ramps and deadlines are exact; probes and HTTP are real."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.backends.admitter import Admitter, Lease, Shed
from gateway.core.backend import BackendConfig, MemoryKind, Signals
from gateway.core.capacity import CapacityConfig
from gateway.core.clock import FakeClock
from gateway.core.pool import AdmissionConfig, ModelPool, Ticket
from gateway.core.queueing import QueueConfig
from gateway.core.types import Outcome, Priority

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., Awaitable[TestServer]]
KVT = 1000  # bytes per token
M = "m"


@dataclass
class Stub:
    status: int = 200
    metrics: str = ""
    probes: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.json_response({}, status=self.status)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics, content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.Response:
        return web.json_response({"usage": {"completion_tokens": 1}})


@dataclass
class Rig:
    clock: FakeClock
    admitter: Admitter
    stubs: dict[str, Stub] = field(default_factory=dict)
    servers: dict[str, TestServer] = field(default_factory=dict)


def backend(url: str, tokens: int, **kw: object) -> BackendConfig:
    kw.setdefault("memory", MemoryKind.CONTIGUOUS)
    kw.setdefault("signals", Signals.GENERIC)
    return BackendConfig(  # type: ignore[arg-type]
        url=url, kv_capacity_bytes=tokens * KVT, block_size=1, probe_interval_s=0.01, **kw
    )


async def rig(
    aiohttp_server: ServerFactory,
    sizes: list[int],
    *,
    cap: CapacityConfig | None = None,
    queue: QueueConfig | None = None,
    enabled: bool = True,
    **kw: object,
) -> Rig:
    stubs, servers, backends = {}, {}, []
    for tokens in sizes:
        stub = Stub()
        server = await aiohttp_server(stub.app())
        url = f"http://127.0.0.1:{server.port}"
        stubs[url], servers[url] = stub, server
        backends.append(backend(url, tokens, **kw))
    config = AdmissionConfig(
        models=(ModelPool(M, KVT, tuple(backends)),),
        enabled=enabled,
        capacity=cap or CapacityConfig(headroom=0.0),
        queue=queue or QueueConfig(max_wait_s=600.0),
    )
    clock = FakeClock()
    admitter = Admitter(config, clock)
    await admitter.start()
    return Rig(clock, admitter, stubs, servers)


def ticket(clock: FakeClock, tokens: int, timeout: float = 600.0, **kw: object) -> Ticket:
    fields: dict[str, object] = {
        "tenant": "t",
        "model": M,
        "priority": Priority.STANDARD,
        "weight": 1.0,
        "prompt_tokens": tokens,
        "max_output_tokens": 0,
        "kv_bytes_per_token": KVT,
        "deadline": clock.now() + timeout,
        "exclude": frozenset(),
    }
    fields.update(kw)
    return Ticket(**fields)  # type: ignore[arg-type]


def backend_view(r: Rig, url: str) -> dict[str, object]:
    model = r.admitter.snapshot()[M]
    assert isinstance(model, dict)
    return next(b for b in model["backends"] if b["url"] == url)


def queue_depth(r: Rig) -> int:
    model = r.admitter.snapshot()[M]
    assert isinstance(model, dict)
    depth = model["queue_depth"]
    assert isinstance(depth, int)
    return depth


async def until(cond: Callable[[], bool], what: str) -> None:
    """Poll a condition the probes will make true (bounded; no timing assertion)."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def probes_seen(stub: Stub, n: int = 2) -> None:
    start = stub.probes
    await until(lambda: stub.probes >= start + n, "probes")


async def test_warm_up_queues_while_loading_then_opens_as_the_backend_keeps_up(
    aiohttp_server: ServerFactory,
) -> None:
    cap = CapacityConfig(headroom=0.0, warmup_floor=0.2)
    r = await rig(aiohttp_server, [10], cap=cap, warmup_s=10.0)
    [(url, stub)] = r.stubs.items()
    stub.status = 503
    try:
        await probes_seen(stub)
        tasks = [asyncio.create_task(r.admitter.acquire(ticket(r.clock, 1))) for _ in range(10)]
        await probes_seen(stub)
        assert not any(t.done() for t in tasks)
        assert queue_depth(r) == 10
        r.clock.advance(30.0)  # the load took 30 s
        stub.status = 200
        await until(lambda: sum(t.done() for t in tasks) == 2, "floor of the ramp")
        await probes_seen(stub)
        assert sum(t.done() for t in tasks) == 2  # 20 % of 10 tokens
        r.clock.advance(5.0)  # time alone opens nothing: how fast it serves is not known yet
        await probes_seen(stub)
        assert sum(t.done() for t in tasks) == 2
        first = next(t for t in tasks if t.done())
        first.result().release(output_tokens=1, ttft_s=0.5)  # its first answer measures it
        # each scrape of a backend that kept up, with what it was given in use, doubles it
        await until(lambda: all(t.done() for t in tasks), "the ramp opens")
        assert backend_view(r, url)["phase"] == "ready"
        assert backend_view(r, url)["load_estimate_s"] == pytest.approx(30.0, abs=0.5)
        for t in tasks:
            t.result().release()
        assert backend_view(r, url)["reserved_bytes"] == 0
    finally:
        await r.admitter.close()


async def test_fragmentation_sheds_large_and_passes_small(aiohttp_server: ServerFactory) -> None:
    cap = CapacityConfig(headroom=0.0, shed_above=0.5, large_request=0.1)
    r = await rig(aiohttp_server, [1000], cap=cap)
    [(url, stub)] = r.stubs.items()
    stub.metrics = "kvgate_gpu_fragmentation_ratio 0.6\n"
    try:
        await until(lambda: backend_view(r, url)["fragmentation"] == 0.6, "fragmentation seen")
        small = await r.admitter.acquire(ticket(r.clock, 10))  # 10 of 1000 usable: small
        with pytest.raises(Shed) as shed:
            await r.admitter.acquire(ticket(r.clock, 150))  # over 10% of usable: large
        assert shed.value.outcome is Outcome.SHED_FRAGMENTATION
        assert shed.value.retry_after_s is not None
        assert shed.value.should_retry
        stub.metrics = "kvgate_gpu_fragmentation_ratio 0.1\n"
        await until(lambda: backend_view(r, url)["fragmentation"] == 0.1, "defragmented")
        large = await r.admitter.acquire(ticket(r.clock, 150))
        small.release()
        large.release()
    finally:
        await r.admitter.close()


async def test_backend_dying_mid_run_is_ejected_and_traffic_moves(
    aiohttp_server: ServerFactory,
) -> None:
    cap = CapacityConfig(headroom=0.0, eject_failures=2, eject_cooldown_s=60.0)
    r = await rig(aiohttp_server, [1000, 500], cap=cap)
    (big, _), (small, _) = r.stubs.items()
    try:
        await until(lambda: backend_view(r, small)["phase"] == "ready", "both up")
        await until(lambda: backend_view(r, big)["phase"] == "ready", "both up")
        leases = [await r.admitter.acquire(ticket(r.clock, 100)) for _ in range(3)]
        assert {lease.backend_url for lease in leases} == {big}
        await r.servers[big].close()  # the backend dies
        async with aiohttp.ClientSession() as session:
            for lease in leases:  # what the proxy does when its upstream call fails
                with pytest.raises(aiohttp.ClientConnectorError):
                    await session.post(big + "/v1/chat/completions", json={})
                lease.release(failure="connect")
        assert backend_view(r, big)["reserved_bytes"] == 0
        # ejected by the failures, or already seen refusing connections by a probe
        assert backend_view(r, big)["phase"] in ("ejected", "loading")
        moved = await r.admitter.acquire(ticket(r.clock, 100))
        assert moved.backend_url == small
        moved.release()
        r.clock.advance(61.0)  # after the cool-down it is still refused: loading, not ready
        await until(lambda: backend_view(r, big)["phase"] == "loading", "seen loading")
        assert (await r.admitter.acquire(ticket(r.clock, 100))).backend_url == small
    finally:
        await r.admitter.close()


async def one_held_one_queued(
    r: Rig, url: str, deadline_s: float = 600.0
) -> tuple[Lease, asyncio.Task[Lease]]:
    """The backend up and full with one request; a second waiting in the queue."""
    await until(lambda: backend_view(r, url)["phase"] == "ready", "up")
    first = await r.admitter.acquire(ticket(r.clock, 100))
    waiting = asyncio.create_task(r.admitter.acquire(ticket(r.clock, 100, timeout=deadline_s)))
    await until(lambda: r.admitter.waiting == 1, "queued")
    return first, waiting


async def test_client_cancelled_while_queued_leaves_nothing(aiohttp_server: ServerFactory) -> None:
    r = await rig(aiohttp_server, [100])
    [(url, _)] = r.stubs.items()
    try:
        first, waiting = await one_held_one_queued(r, url)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert r.admitter.waiting == 0
        assert queue_depth(r) == 0
        first.release()
        first.release()  # idempotent
        assert backend_view(r, url)["reserved_bytes"] == 0
        assert backend_view(r, url)["inflight"] == 0
    finally:
        await r.admitter.close()


async def test_queued_request_past_its_deadline_is_shed(aiohttp_server: ServerFactory) -> None:
    r = await rig(aiohttp_server, [100])
    [(url, _)] = r.stubs.items()
    try:
        first, waiting = await one_held_one_queued(r, url, deadline_s=5.0)
        r.clock.advance(5.0)
        with pytest.raises(Shed) as shed:
            await waiting  # the next probe pumps the queue and finds the deadline passed
        assert shed.value.outcome is Outcome.SHED_DEADLINE
        first.release()
    finally:
        await r.admitter.close()


async def test_release_hands_memory_to_the_queue_at_once(aiohttp_server: ServerFactory) -> None:
    r = await rig(aiohttp_server, [100])
    [(url, _)] = r.stubs.items()
    try:
        first, waiting = await one_held_one_queued(r, url)
        first.release()
        # no idle gap: the waiter holds the memory before the loop runs anything else
        assert r.admitter.waiting == 0
        assert backend_view(r, url)["reserved_bytes"] == 100 * KVT
        (await waiting).release()
    finally:
        await r.admitter.close()


async def test_overload_never_exceeds_capacity_and_every_request_ends(
    aiohttp_server: ServerFactory,
) -> None:
    """3x more demand than capacity: reservations stay within usable bytes, every request is
    served or shed with a Retry-After, and nothing is left reserved."""
    cap = CapacityConfig(headroom=0.1)
    r = await rig(aiohttp_server, [1000, 600], cap=cap, queue=QueueConfig(max_depth=40))
    urls = list(r.stubs)
    rng = random.Random(4)
    peak: dict[str, float] = dict.fromkeys(urls, 0.0)
    outcomes: list[str] = []
    retry_afters: list[float | None] = []

    def check() -> None:
        for url in urls:
            view = backend_view(r, url)
            reserved, usable = view["reserved_bytes"], view["usable"]
            assert isinstance(reserved, int)
            assert isinstance(usable, float)
            assert reserved <= usable + 1e-6
            peak[url] = max(peak[url], reserved / usable)

    async def one(i: int) -> None:
        try:
            lease: Lease = await r.admitter.acquire(
                ticket(r.clock, rng.randint(50, 300), tenant=f"t{i % 3}")
            )
        except Shed as shed:
            retry_afters.append(shed.retry_after_s)
            outcomes.append(shed.outcome.value)
            return
        check()
        await asyncio.sleep(rng.uniform(0.0, 0.02))
        lease.release(output_tokens=0)
        outcomes.append("ok")

    try:
        for url in urls:
            await until(lambda u=url: backend_view(r, u)["phase"] == "ready", "up")  # type: ignore[misc]
        await asyncio.gather(*(one(i) for i in range(150)))
        check()
        assert len(outcomes) == 150
        assert outcomes.count("ok") > 0
        assert all(retry is not None and retry >= 1.0 for retry in retry_afters)
        for url in urls:
            assert backend_view(r, url)["reserved_bytes"] == 0
            assert peak[url] > 0.5  # the backends were kept busy
    finally:
        await r.admitter.close()


async def test_disabled_admission_round_robins_healthy_backends(
    aiohttp_server: ServerFactory,
) -> None:
    r = await rig(aiohttp_server, [10, 10, 10], enabled=False)
    urls = list(r.stubs)
    r.stubs[urls[2]].status = 503
    try:
        await until(lambda: backend_view(r, urls[2])["phase"] == "loading", "third loading")
        await until(lambda: all(backend_view(r, u)["phase"] == "ready" for u in urls[:2]), "two up")
        leases = [await r.admitter.acquire(ticket(r.clock, 10**6)) for _ in range(4)]
        assert [lease.backend_url for lease in leases] == [urls[0], urls[1]] * 2
        for lease in leases:
            lease.release()
    finally:
        await r.admitter.close()


async def test_reconfigure_keeps_leases_of_persisting_backends(
    aiohttp_server: ServerFactory,
) -> None:
    r = await rig(aiohttp_server, [100, 100])
    keep, drop = list(r.stubs)
    try:
        await until(lambda: backend_view(r, keep)["phase"] == "ready", "up")
        await until(lambda: backend_view(r, drop)["phase"] == "ready", "up")
        lease = await r.admitter.acquire(ticket(r.clock, 60, exclude=frozenset({drop})))
        r.admitter.reconfigure(
            AdmissionConfig(
                models=(ModelPool(M, KVT, (backend(keep, 100),)),),
                capacity=CapacityConfig(headroom=0.0),
            )
        )
        assert backend_view(r, keep)["reserved_bytes"] == 60 * KVT
        assert backend_view(r, keep)["phase"] == "ready"
        lease.release()
        assert backend_view(r, keep)["reserved_bytes"] == 0
    finally:
        await r.admitter.close()
