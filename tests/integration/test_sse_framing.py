"""SSE streams as real servers frame them: CRLF events, comments and keep-alives, `data:` without
a space, multi-line events. The gateway relays them as they arrive, hides the usage chunk it
asked for, and settles the output to what was streamed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.core.clock import FakeClock
from gateway.metrics import Metrics
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from gateway.state import GATEWAY
from tests.integration.conftest import MakeGateway, policy_text, until
from tests.integration.rawbackend import (
    USAGE_CHUNK,
    MakeRawBackend,
    RawRequest,
    chunk,
    head,
    sse_chunk,
    sse_event,
)
from tests.integration.traffic import CHAT, health, tokens_counted

pytestmark = pytest.mark.integration

SSE = "Content-Type: text/event-stream"
SSE_UTF8 = "Content-Type: text/event-stream; charset=utf-8"


def _crlf_events(request: RawRequest) -> bytes:
    # sse-starlette (llama-cpp-python, many OpenAI-compatible servers) ends events with CRLF;
    # the usage chunk comes only when asked for, as from a real server; it counts 3 tokens for
    # 4 chunks, so the settled 3 shows the gateway asked for it and read it
    events = [sse_chunk(i) for i in range(4)]
    if request.asks_for_usage():
        events.append(USAGE_CHUNK)
    body = b"".join(sse_event(e, end=b"\r\n\r\n") for e in events)
    return head("200 OK", SSE_UTF8) + body + b"data: [DONE]\r\n\r\n"


def _crlf_pings(request: RawRequest) -> bytes:
    # sse-starlette's periodic `: ping` comments, CRLF-framed, from a server without usage
    body = b": ping\r\n\r\n".join(sse_event(sse_chunk(i), end=b"\r\n\r\n") for i in range(2))
    return head("200 OK", SSE) + b": ping\r\n\r\n" + body + b"data: [DONE]\r\n\r\n"


def _comments_and_keepalives(request: RawRequest) -> bytes:
    # a backend that ignores stream_options: the gateway must count the chunks itself
    events = b"".join(sse_event(sse_chunk(i), data=b"data:") for i in range(2))
    noise = b": keep-alive\n\n" * 3 + b"event: ping\ndata: {}\n\n"
    return head("200 OK", SSE) + noise + events + b"data: [DONE]\n\n"


def _unspaced_and_multiline(request: RawRequest) -> bytes:
    # `data:` without a space, and a usage event split over two `data:` lines after an `id:`
    events = b"".join(sse_event(sse_chunk(i), data=b"data:") for i in range(2))
    usage = json.dumps(USAGE_CHUNK).encode()
    cut = usage.index(b'"usage"')
    split = b"id: 3\ndata: " + usage[:cut] + b"\ndata: " + usage[cut:] + b"\n\n"
    return head("200 OK", SSE_UTF8) + events + split + b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("wire", "last_token", "output_tokens", "ending"),
    [
        (_crlf_events, "t3", 3, "data: [DONE]\r\n\r\n"),
        (_crlf_pings, "t1", 2, "data: [DONE]\r\n\r\n"),
        (_comments_and_keepalives, "t1", 2, "data: [DONE]\n\n"),
        (_unspaced_and_multiline, "t1", 3, "data: [DONE]\n\n"),
    ],
    ids=["crlf-usage-asked", "crlf-pings", "comments-and-keepalives", "unspaced-and-multiline"],
)
async def test_a_stream_is_relayed_whole_with_its_usage_hidden_and_settled(
    make_gateway: MakeGateway,
    raw_backend: MakeRawBackend,
    wire: Callable[[RawRequest], bytes],
    last_token: str,
    output_tokens: int,
    ending: str,
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(wire(request))

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url]))
    body = {**CHAT, "stream": True, "max_tokens": 900}
    text = await (await client.post("/v1/chat/completions", json=body)).text()
    assert backend.requests[-1].asks_for_usage()
    assert last_token in text
    assert "usage" not in text  # the client did not ask for it
    assert text.endswith(ending)
    await until(lambda: tokens_counted(metrics, "output") is not None)
    assert tokens_counted(metrics, "output") == output_tokens


async def test_crlf_sse_events_reach_the_client_as_they_arrive(
    make_gateway: MakeGateway, raw_backend: MakeRawBackend
) -> None:
    go_on = asyncio.Event()

    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(head("200 OK", SSE, "Transfer-Encoding: chunked"))
        writer.write(chunk(sse_event(sse_chunk(0), end=b"\r\n\r\n")))
        await writer.drain()
        await go_on.wait()
        writer.write(chunk(b"data: [DONE]\r\n\r\n") + b"0\r\n\r\n")

    backend = await raw_backend(script)
    client, _ = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    try:
        first = await asyncio.wait_for(response.content.readuntil(b"\r\n\r\n"), 5)
    finally:
        go_on.set()
    assert b'"t0 "' in first


async def test_time_to_first_token_of_a_stream_is_measured_at_its_first_event(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACME_KEY", "sk-acme")
    first_token = asyncio.Event()
    headers_sent = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        # uvicorn + Starlette (vLLM, SGLang) send the headers before the first token exists
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        headers_sent.set()
        await first_token.wait()
        await response.write(sse_event(sse_chunk(0)))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", stream)
    server = await aiohttp_server(app)
    clock = FakeClock()
    metrics = Metrics()
    policy = compile_policy(load_text(policy_text([f"http://127.0.0.1:{server.port}"])))
    client = await aiohttp_client(build_app(policy, clock=clock, metrics=metrics))
    await until(lambda: client.app[GATEWAY].admitter.any_ready())
    request = asyncio.ensure_future(
        client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    )
    try:
        await asyncio.wait_for(headers_sent.wait(), 5)
        clock.advance(10.0)  # prefill: ten seconds before the first token
    finally:
        first_token.set()
    await (await request).read()
    labels = {"model": "m1"}
    name = "kvgate_upstream_first_byte_seconds_count"
    await until(lambda: metrics.registry.get_sample_value(name, labels) == 1)
    ttft = metrics.registry.get_sample_value("kvgate_upstream_first_byte_seconds_sum", labels)
    assert ttft == 10.0
