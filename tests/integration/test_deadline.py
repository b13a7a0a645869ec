"""The exchange deadline on a real event loop: it fires once its time passes, moving it later
keeps a flowing stream alive, moving it earlier takes effect at once, and a cancellation that is
not its own is never mistaken for a timeout. Through the gateway: a stream slower in total than
its idle timeout but never idle that long completes; the total timeout still ends it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.proxy.deadline import Deadline
from tests.integration.conftest import MakeGateway, policy_text

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "stream": True}


async def _guarded(deadline_in: float, work: Callable[[Deadline], Awaitable[None]]) -> str:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop.time() + deadline_in)
    try:
        await work(deadline)
    except asyncio.CancelledError:
        if not deadline.timed_out():
            raise
        return "timed out"
    finally:
        deadline.close()
    return "done"


async def test_a_deadline_cancels_the_work_when_its_time_passes() -> None:
    assert await _guarded(0.01, lambda _: asyncio.sleep(30)) == "timed out"


async def test_moving_it_later_on_every_chunk_keeps_flowing_work_alive() -> None:
    loop = asyncio.get_running_loop()

    async def stream(deadline: Deadline) -> None:
        for _ in range(30):  # 30 gaps of 10 ms: three times the 100 ms it is moved by
            await asyncio.sleep(0.01)
            deadline.move(loop.time() + 0.1)

    assert await _guarded(0.1, stream) == "done"


async def test_moving_it_earlier_takes_effect_at_once() -> None:
    loop = asyncio.get_running_loop()

    async def shorten(deadline: Deadline) -> None:
        deadline.move(loop.time() + 0.01)
        await asyncio.sleep(30)

    assert await asyncio.wait_for(_guarded(30, shorten), 10) == "timed out"


async def test_another_cancellation_is_not_a_timeout() -> None:
    started = asyncio.Event()

    async def wait(_: Deadline) -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.ensure_future(_guarded(30, wait))
    await started.wait()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    raise AssertionError("the cancellation was swallowed")


def _slow_stream_backend(gap_s: float, chunks: int) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(chunks):
            delta = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
            await response.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
            await asyncio.sleep(gap_s)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def test_a_stream_longer_than_its_idle_timeout_but_never_idle_completes(
    make_gateway: MakeGateway, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    server = await aiohttp_server(_slow_stream_backend(gap_s=0.02, chunks=30))
    client, _ = await make_gateway(policy_text([f"http://127.0.0.1:{server.port}"], idle="200ms"))
    response = await client.post("/v1/chat/completions", json=CHAT)
    text = await response.text()
    assert "t29" in text
    assert "timeout" not in text
    assert text.rstrip().endswith("data: [DONE]")


async def test_the_total_timeout_ends_a_stream_that_is_never_idle(
    make_gateway: MakeGateway, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    server = await aiohttp_server(_slow_stream_backend(gap_s=0.02, chunks=500))
    text = policy_text([f"http://127.0.0.1:{server.port}"], idle="200ms")
    client, _ = await make_gateway(text.replace("total: 30s", "total: 300ms"))
    response = await client.post("/v1/chat/completions", json=CHAT)
    body = await response.text()
    assert "t0" in body
    assert "upstream total timeout after 0.3s" in body
    assert "t499" not in body
