"""Which upstream timeout fires, and when: the first-byte budget for a stream silent after its
headers, and never the idle one for a backend whose client reads slowly."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.integration.conftest import MakeGateway, policy_text, until
from tests.integration.rawbackend import MakeRawBackend, RawRequest, head, sse_chunk
from tests.integration.traffic import CHAT, health, requests_counted

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., Awaitable[TestServer]]


async def test_a_stream_silent_after_its_headers_reports_the_timeout_that_fired(
    make_gateway: MakeGateway, raw_backend: MakeRawBackend
) -> None:
    stop = asyncio.Event()

    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(
            head("200 OK", "Content-Type: text/event-stream", "Transfer-Encoding: chunked")
        )
        await writer.drain()
        await stop.wait()

    backend = await raw_backend(script)
    client, _ = await make_gateway(policy_text([backend.url], first_byte="300ms", idle="10s"))
    try:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        text = await response.text()
    finally:
        stop.set()
    # it waited the 0.3 s first-byte budget, not the 10 s idle one it names
    assert "upstream idle timeout after 10s" not in text
    assert "timeout after 0.3s" in text


async def test_a_client_reading_slowly_is_not_counted_as_an_idle_backend(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    event = b"data: " + json.dumps(sse_chunk(0)).encode() + b"\n\n"
    burst = event * (16 * 1024 * 1024 // len(event))  # more than the sockets to the client hold
    hold = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if body["messages"][0]["content"] == "slow reader":
            await response.write(burst)  # the backend has it all ready: never idle
            await response.write(b"data: [DONE]\n\n")
        else:  # this one goes idle after its first event: it ends with the idle timeout
            await response.write(event)
            await hold.wait()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", stream)
    server = await aiohttp_server(app)
    client, metrics = await make_gateway(
        policy_text([f"http://127.0.0.1:{server.port}"], idle="300ms")
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps(
        {**CHAT, "stream": True, "messages": [{"role": "user", "content": "slow reader"}]}
    ).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    try:
        await reader.readuntil(b"\r\n\r\n")  # the answer started; from now on it is not read
        # The gateway fills the sockets to the slow reader within milliseconds and then waits on
        # them; an idle stream started now ends with its idle timeout after that: by then the
        # slow reader's stream has waited on its client for longer than the idle timeout.
        idle = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert "upstream idle timeout" in await idle.text()
        text = await reader.read()  # the slow client reads everything now
    finally:
        hold.set()
        writer.close()
        await writer.wait_closed()
    assert b"upstream idle timeout" not in text
    assert text.rstrip(b"\r\n0").endswith(b"data: [DONE]")
    await until(lambda: requests_counted(metrics, "ok") == 1)
    assert requests_counted(metrics, "upstream_timeout") == 1  # the idle backend's only
