"""Connection hygiene through the real listener (``GuardedSite``) on loopback: one client's
idle and slow connections are capped and timed out, and others are served meanwhile.

The hostile client connects from 127.0.0.2 (Linux routes all of 127/8 to loopback), so the
per-client cap tells it apart from the well-behaved one on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gateway.app import CONNECTIONS, build_app
from gateway.metrics import Metrics
from gateway.policy.compile import ConnectionLimits, compile_policy
from gateway.policy.loader import load_text
from gateway.proxy.connections import ConnectionGuard, GuardedSite, global_cap
from tests.integration.conftest import policy_text

pytestmark = pytest.mark.integration

HOSTILE = "127.0.0.2"
ATTACK = 2000


def _raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@contextlib.asynccontextmanager
async def serving(extra: str) -> AsyncIterator[tuple[str, int, Metrics, ConnectionGuard]]:
    text = policy_text(["http://127.0.0.1:9"]).replace(
        "  max_body: 64KiB\n", f"  max_body: 64KiB\n  connections: {{{extra}}}\n"
    )
    policy = compile_policy(load_text(text), env={"ACME_KEY": "sk-acme"})
    metrics = Metrics()
    app = build_app(policy, metrics=metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, app[CONNECTIONS], backlog=4096)
    await site.start()
    try:
        yield "127.0.0.1", site.port, metrics, app[CONNECTIONS]
    finally:
        await runner.cleanup()


async def _open(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for _ in range(count):
        conns.append(
            await asyncio.open_connection("127.0.0.1", port, local_addr=(HOSTILE, 0), limit=4096)
        )
    return conns


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """What the server wrote before closing (empty for a deadline's abort)."""
    with contextlib.suppress(ConnectionError):
        return await reader.read()
    return b""


# Checks: 2,000 idle and slow-header connections from one address do not deny service to
# another; all but per_client are refused at once with a 503, the rest closed at deadlines.
async def test_two_thousand_idle_and_slow_connections_do_not_deny_others() -> None:
    _raise_file_limit(ATTACK * 2 + 512)
    # deadlines well past the time opening the connections takes on a loaded machine: a held one
    # that times out before the last is opened would let that one in instead of refusing it
    extra = "per_client: 100, first_request: 6s, headers: 6s, idle: 6s"
    async with serving(extra) as (host, port, metrics, guard):
        conns = await _open(port, ATTACK)
        for _, writer in conns[: ATTACK // 2]:  # slow headers: a request line, never finished
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(20):
                async with session.get(f"http://{host}:{port}/healthz") as response:
                    statuses.append(response.status)
        assert statuses == [200] * 20
        answers = await asyncio.wait_for(
            asyncio.gather(*(_closed(reader) for reader, _ in conns)), 30
        )
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) == ATTACK - 100
        assert all(b"connections_full" in a for a in refused)
        assert metrics.registry.get_sample_value(
            "kvgate_connections_refused_total", {"reason": "per_client"}
        ) == float(ATTACK - 100)
        timed_out = sum(
            metrics.registry.get_sample_value("kvgate_connections_timed_out_total", {"phase": p})
            or 0.0
            for p in ("first_request", "headers")
        )
        assert timed_out == 100.0
        for _, writer in conns:
            writer.close()
        await asyncio.sleep(0)
        assert guard.open == 0


# Checks: a keep-alive connection left idle after an answer is closed at the idle deadline,
# and a request in progress is never cut by it.
async def test_idle_keep_alive_is_closed_but_a_slow_handler_is_not() -> None:
    async with serving("first_request: 1s, headers: 1s, idle: 1s") as (host, port, metrics, _):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(_closed(reader), 10)
        assert (
            metrics.registry.get_sample_value(
                "kvgate_connections_timed_out_total", {"phase": "idle"}
            )
            == 1.0
        )
        writer.close()


# Checks: the global cap answers a clear 503 beyond it, from any address.
async def test_the_global_cap_refuses_with_a_503() -> None:
    async with serving("max: 30, first_request: 30s") as (host, port, metrics, guard):
        assert guard.max_open == 30
        conns = await _open(port, 30)
        await asyncio.sleep(0.1)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}:{port}/healthz") as response,
        ):
            assert response.status == 503
            body = await response.json()
        assert body["error"]["code"] == "connections_full"
        assert metrics.registry.get_sample_value(
            "kvgate_connections_refused_total", {"reason": "global"}
        )
        for _, writer in conns:
            writer.close()


# Checks: the cap stays below the file limit whatever the policy asks.
@pytest.mark.parametrize(
    ("asked", "files", "expected"), [(None, 1024, 512), (100, 1024, 100), (5000, 1024, 1008)]
)
def test_the_global_cap_is_below_the_file_limit(
    asked: int | None, files: int, expected: int
) -> None:
    assert global_cap(ConnectionLimits(max_open=asked), files) == expected


# Checks: a body that does not arrive within `body` is a 408 in the API's error shape.
async def test_a_slow_body_is_a_408() -> None:
    async with serving("body: 1s") as (host, port, _, _guard):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"'
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408")
        assert b"x-kvgate-outcome: request_timeout" in head
        writer.close()


# Checks: a client that leaves while its request is handled is not counted, later, as an idle
# connection closed at the deadline (the handler ends after the connection did).
async def test_a_client_gone_mid_request_is_not_timed_out_later() -> None:
    async with serving("body: 1s, idle: 1s") as (host, port, metrics, guard):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"'
        )
        await asyncio.sleep(0.2)  # the handler is reading the body
        writer.close()
        await asyncio.sleep(3)  # past the body deadline, then past the idle one
        assert guard.open == 0
        timed_out = metrics.registry.get_sample_value(
            "kvgate_connections_timed_out_total", {"phase": "idle"}
        )
        assert not timed_out
