"""The concurrency limiter over real HTTP on 127.0.0.1, in front of a real aiohttp backend that
holds each request until the test lets it go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loadtest.limiter import build


class Backend:
    """Counts requests in flight (and the most ever at once); each waits for ``release``.
    ``/stream`` sends one chunk, then the second only after ``next_chunk`` is set."""

    def __init__(self, changed: asyncio.Event | None = None) -> None:
        self.changed = changed or asyncio.Event()  # set whenever a request arrives
        self.in_flight = 0
        self.most = 0
        self.seen = 0
        self.release = asyncio.Event()
        self.next_chunk = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/v1/hold", self.hold)
        self.app.router.add_get("/stream", self.stream)

    async def hold(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.seen += 1
        self.most = max(self.most, self.in_flight)
        self.changed.set()
        try:
            await self.release.wait()
            return web.json_response({"echo": await request.json(), "q": request.query_string})
        finally:
            self.in_flight -= 1

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await self.next_chunk.wait()
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp


Stub = tuple[Backend, str]


async def until(stub: Backend, condition: Callable[[], bool]) -> None:
    while not condition():
        stub.changed.clear()
        await stub.changed.wait()


@pytest.fixture
async def backend() -> AsyncIterator[Stub]:
    stub = Backend()
    server = TestServer(stub.app, host="127.0.0.1")
    await server.start_server()
    yield stub, str(server.make_url("")).rstrip("/")
    await server.close()


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_never_more_than_limit_in_flight_and_all_finish(backend: Stub) -> None:
    stub, url = backend
    server = await serve(build([url], limit=3))
    async with aiohttp.ClientSession() as session:

        async def call(i: int) -> tuple[int, dict[str, Any]]:
            async with session.post(server.make_url(f"/v1/hold?i={i}"), json={"i": i}) as resp:
                return resp.status, await resp.json()

        tasks = [asyncio.create_task(call(i)) for i in range(10)]
        await until(stub, lambda: stub.in_flight == 3)
        assert stub.seen == 3  # the other seven wait in the limiter, not at the backend
        stub.release.set()
        answers = await asyncio.gather(*tasks)
    await server.close()
    assert stub.most == 3
    assert stub.seen == 10
    assert sorted(a[1]["echo"]["i"] for a in answers) == list(range(10))
    assert {a[0] for a in answers} == {200}
    assert answers[4][1]["q"] == "i=4"


async def test_a_request_waiting_too_long_gets_503_with_retry_after(backend: Stub) -> None:
    stub, url = backend
    server = await serve(build([url], limit=1, max_wait_s=0.05))
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(session.post(server.make_url("/v1/hold"), json={}))
        await until(stub, lambda: stub.in_flight == 1)
        async with session.post(server.make_url("/v1/hold"), json={}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
        stub.release.set()
        async with await first as resp:
            assert resp.status == 200
        # the slot came back: the next request goes through
        async with session.post(server.make_url("/v1/hold"), json={"x": 1}) as resp:
            assert resp.status == 200
    await server.close()
    assert stub.most == 1


async def test_streams_pass_through_chunk_by_chunk(backend: Stub) -> None:
    stub, url = backend
    server = await serve(build([url], limit=1))
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/stream")) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        # the backend holds the second chunk until the client has read the first
        assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
        stub.next_chunk.set()
        assert await resp.content.read() == b"data: two\n\n"
    await server.close()


async def test_slots_are_per_backend(backend: Stub) -> None:
    stub, url = backend
    other = Backend(stub.changed)
    other_server = await serve(other.app)
    server = await serve(build([url, str(other_server.make_url("")).rstrip("/")], limit=2))
    async with aiohttp.ClientSession() as session:

        async def call() -> int:
            async with session.post(server.make_url("/v1/hold"), json={}) as resp:
                return resp.status

        tasks = [asyncio.create_task(call()) for _ in range(6)]
        await until(stub, lambda: stub.in_flight + other.in_flight == 4)
        assert (stub.in_flight, other.in_flight) == (2, 2)
        stub.release.set()
        other.release.set()
        assert await asyncio.gather(*tasks) == [200] * 6
    await server.close()
    await other_server.close()
