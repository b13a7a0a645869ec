"""Edge cases of the proxy path, as real servers produce them: HTTP semantics, SSE framing,
errors and settlement, each against a real backend on 127.0.0.1. Where the stub cannot produce
the bytes a real server sends (CRLF events, chunked JSON, a connection cut mid-body), a raw
asyncio backend does."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.clock import FakeClock
from gateway.metrics import Metrics
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from gateway.state import GATEWAY
from gateway.store.memory import MemoryLimitStore
from tests.integration.conftest import MakeGateway, policy_text, until
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
ACME = {"Authorization": "Bearer sk-acme"}
TOKENS_LIMIT = "      - {unit: tokens, rate: 1000/min}"
ServerFactory = Callable[..., Awaitable[TestServer]]


def _with_fallback(text: str) -> str:
    """The policy with `fallback_model: m1`: paths without a JSON model are proxied to m1."""
    return text.replace("anonymous_tenant: anon", "anonymous_tenant: anon\n  fallback_model: m1")


def _tokens(metrics: object, kind: str, tenant: str = "anon") -> float | None:
    labels = {"tenant": tenant, "model": "m1", "kind": kind}
    return metrics.registry.get_sample_value("kvgate_tokens_total", labels)  # type: ignore[attr-defined,no-any-return]


def _outcomes(metrics: object, outcome: str, tenant: str = "anon") -> float | None:
    labels = {"tenant": tenant, "model": "m1", "outcome": outcome}
    return metrics.registry.get_sample_value("kvgate_requests_total", labels)  # type: ignore[attr-defined,no-any-return]


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stream_through(
    make_gateway: MakeGateway,
    raw_backend: Callable[[Script], Awaitable[RawBackend]],
    script: Script,
) -> tuple[str, Metrics]:
    """A streamed chat request (``max_tokens`` 900) through a gateway in front of ``script``:
    the text the client got, and the gateway's metrics."""
    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url]))
    body = {**CHAT, "stream": True, "max_tokens": 900}
    text = await (await client.post("/v1/chat/completions", json=body)).text()
    return text, metrics


# -- a raw backend: exact bytes on the wire --------------------------------------------------------


@dataclass
class RawRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Script = Callable[[asyncio.StreamWriter, RawRequest], Awaitable[None]]


@dataclass
class RawBackend:
    """Answers `GET /health` itself; every other request is handed to `script`, which writes the
    whole answer (status line included); the connection is closed after it."""

    script: Script
    requests: list[RawRequest] = field(default_factory=list)
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # no connection is being served

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.done.set()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()  # idle keep-alive connections: their readers see the end
        await self.done.wait()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.done.clear()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {}
                for item in lines:
                    if item:
                        name, _, value = item.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if target == "/health":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                request = RawRequest(method, target, headers, body)
                self.requests.append(request)
                await self.script(writer, request)
                await writer.drain()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            self.writers.discard(writer)
            if not self.writers:
                self.done.set()


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[Script], Awaitable[RawBackend]]]:
    backends: list[RawBackend] = []

    async def make(script: Script) -> RawBackend:
        backend = RawBackend(script)
        await backend.start()
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        await backend.close()


def _head(status: str, *headers: str) -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{lines}Connection: close\r\n\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse_chunk(i: int) -> dict[str, object]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m1",
        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
    }


USAGE_CHUNK = {
    "id": "c",
    "object": "chat.completion.chunk",
    "model": "m1",
    "choices": [],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}


# -- SSE framing -----------------------------------------------------------------------------------


async def test_crlf_sse_events_reach_the_client_as_they_arrive(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    go_on = asyncio.Event()

    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(
            _head("200 OK", "Content-Type: text/event-stream", "Transfer-Encoding: chunked")
        )
        writer.write(_chunk(b"data: " + json.dumps(_sse_chunk(0)).encode() + b"\r\n\r\n"))
        await writer.drain()
        await go_on.wait()
        writer.write(_chunk(b"data: [DONE]\r\n\r\n") + b"0\r\n\r\n")

    backend = await raw_backend(script)
    client, _ = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    try:
        # sse-starlette (llama-cpp-python, many OpenAI-compatible servers) ends events with CRLF
        first = await asyncio.wait_for(response.content.readuntil(b"\r\n\r\n"), 5)
    finally:
        go_on.set()
    assert b'"t0 "' in first


async def test_crlf_sse_usage_chunk_asked_by_the_gateway_is_hidden_and_settled(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        events = [_sse_chunk(i) for i in range(3)]
        if json.loads(request.body).get("stream_options", {}).get("include_usage"):
            events.append(USAGE_CHUNK)
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)
        writer.write(_head("200 OK", "Content-Type: text/event-stream; charset=utf-8"))
        writer.write(body + b"data: [DONE]\r\n\r\n")

    text, metrics = await _stream_through(make_gateway, raw_backend, script)
    assert "t2" in text
    assert '"usage"' not in text
    await until(lambda: _tokens(metrics, "output") is not None)
    assert _tokens(metrics, "output") == 3


async def test_sse_comments_and_keepalives_are_not_counted_as_output_tokens(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        # a backend that ignores stream_options: the gateway must count the chunks itself
        writer.write(_head("200 OK", "Content-Type: text/event-stream"))
        writer.write(b": keep-alive\n\n" * 3 + b"event: ping\ndata: {}\n\n")
        writer.write(
            b"".join(b"data:" + json.dumps(_sse_chunk(i)).encode() + b"\n\n" for i in range(2))
        )
        writer.write(b"data: [DONE]\n\n")

    text, metrics = await _stream_through(make_gateway, raw_backend, script)
    assert text.endswith("data: [DONE]\n\n")
    await until(lambda: _tokens(metrics, "output") is not None)
    assert _tokens(metrics, "output") == 2


# Checks: `data:` without a space, a multi-line usage event and a charset parameter on the
# content type: the usage is still read and hidden.
async def test_sse_framing_variants_still_hide_and_settle_the_usage(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(_head("200 OK", "Content-Type: text/event-stream; charset=utf-8"))
        for i in range(2):
            writer.write(b"data:" + json.dumps(_sse_chunk(i)).encode() + b"\n\n")
        usage = json.dumps(USAGE_CHUNK).encode()
        cut = usage.index(b'"usage"')
        writer.write(b"id: 3\ndata: " + usage[:cut] + b"\ndata: " + usage[cut:] + b"\n\n")
        writer.write(b"data: [DONE]\n\n")

    text, metrics = await _stream_through(make_gateway, raw_backend, script)
    assert "t1" in text
    assert "usage" not in text
    await until(lambda: _tokens(metrics, "output") is not None)
    assert _tokens(metrics, "output") == 3


# Checks: a 103 Early Hints interim answer before the real one is skipped, not relayed as final.
async def test_an_interim_1xx_answer_is_skipped(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        answer = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}})
        length = f"Content-Length: {len(answer)}"
        writer.write(_head("200 OK", "Content-Type: application/json", length) + answer.encode())

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    assert (await response.json())["usage"]["completion_tokens"] == 4
    await until(lambda: _tokens(metrics, "output") == 4)


# -- JSON answers without a length -----------------------------------------------------------------


async def test_chunked_json_answer_settles_to_its_usage(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    answer = {
        "id": "c",
        "object": "chat.completion",
        "model": "m1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5},
    }

    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        # Go servers (Ollama) chunk any answer larger than their 2 KiB write buffer
        data = json.dumps(answer).encode()
        writer.write(
            _head("200 OK", "Content-Type: application/json", "Transfer-Encoding: chunked")
        )
        writer.write(_chunk(data[:20]) + _chunk(data[20:]) + b"0\r\n\r\n")

    backend = await raw_backend(script)
    limits = TOKENS_LIMIT
    client, metrics = await make_gateway(policy_text([backend.url], acme_limits=limits))
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 900}, headers=ACME
    )
    assert (await response.json())["usage"]["completion_tokens"] == 5
    await until(lambda: _tokens(metrics, "output", "acme") is not None)
    assert _tokens(metrics, "output", "acme") == 5


async def test_json_answer_over_the_buffer_limit_settles_to_its_usage(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    async def embeddings(request: web.Request) -> web.Response:
        await request.read()
        vector = [0.125] * (9 * 1024 * 1024 // 6)  # ~9 MiB of JSON, over the 8 MiB buffer
        body = {"object": "list", "data": [{"embedding": vector}], "usage": {"prompt_tokens": 777}}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_post("/v1/embeddings", embeddings)
    server = await aiohttp_server(app)
    client, metrics = await make_gateway(policy_text([f"http://127.0.0.1:{server.port}"]))
    response = await client.post("/v1/embeddings", json={"model": "m1", "input": "hello"})
    assert response.status == 200
    await response.read()
    await until(lambda: _tokens(metrics, "input") is not None)
    assert _tokens(metrics, "input") == 777


# -- settlement of answers that are not successes --------------------------------------------------


@pytest.mark.parametrize("status", [400, 500])
async def test_a_backend_error_answer_is_charged_no_output_tokens(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory, status: int
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        error = {"error": {"message": "bad", "type": "BadRequestError", "code": status}}
        return web.json_response(error, status=status)

    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_post("/v1/chat/completions", refuse)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    client, metrics = await make_gateway(policy_text([url], acme_limits=TOKENS_LIMIT))
    body = {**CHAT, "max_tokens": 900}
    response = await client.post("/v1/chat/completions", json=body, headers=ACME)
    assert response.status == status  # the backend's answer is passed through
    assert (await response.json())["error"]["message"] == "bad"
    await until(lambda: _tokens(metrics, "output", "acme") is not None)
    assert _tokens(metrics, "output", "acme") == 0


# -- request bodies and headers --------------------------------------------------------------------


async def test_a_gzip_request_body_reaches_the_backend_in_one_consistent_encoding(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    response = await client.post(
        "/v1/chat/completions",
        data=gzip.compress(json.dumps(CHAT).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert response.status == 200
    assert json.loads(stub.requests[-1].body) == CHAT


# Checks: bodies a backend would refuse are refused with 400 and never forwarded.
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"model": "m1", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        json.dumps({**CHAT, "model": 5}).encode(),
        json.dumps({**CHAT, "max_tokens": -1}).encode(),
        json.dumps({**CHAT, "n": 0}).encode(),
        json.dumps({**CHAT, "stream_options": "yes", "stream": True}).encode(),
    ],
    ids=["empty", "not-utf8", "model-int", "negative-max-tokens", "n-zero", "options-string"],
)
async def test_malformed_bodies_are_400_and_never_forwarded(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str, data: bytes
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    response = await client.post(
        "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"
    assert not stub.requests


# Checks: an absurd `n` is refused up front (never fits), not forwarded and not a 500.
async def test_a_huge_n_is_refused_without_reaching_the_backend(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "n": 10**9})
    assert 400 <= response.status < 500
    assert response.headers["x-should-retry"] == "false"
    assert not stub.requests


async def test_repeated_x_forwarded_for_headers_are_all_kept(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    headers = [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")]
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).status == 200
    assert stub.requests[-1].headers["X-Forwarded-For"] == "10.0.0.1, 10.0.0.2, 127.0.0.1"


async def test_a_body_without_content_type_is_forwarded_without_one(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    # e.g. `requests.post(url, data=json.dumps(body))`: FastAPI (vLLM, SGLang) reads a body
    # without Content-Type as JSON, and refuses one labelled application/octet-stream
    response = await client.post(
        "/v1/chat/completions", data=json.dumps(CHAT).encode(), skip_auto_headers=["Content-Type"]
    )
    assert response.status == 200
    assert "Content-Type" not in stub.requests[-1].headers


async def test_headers_the_backend_lists_in_connection_do_not_reach_the_client(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(
            _head(
                "200 OK",
                "Content-Type: application/json",
                "Content-Length: 2",
                "Connection: X-Backend-Hop",
                "X-Backend-Hop: internal",
            )
            + b"{}"
        )

    backend = await raw_backend(script)
    client, _ = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    assert "X-Backend-Hop" not in response.headers


# -- HTTP semantics on pass-through paths ----------------------------------------------------------


@dataclass
class _Echo:
    seen: list[tuple[str, str, dict[str, list[str]], bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", _health)
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        self.seen.append((request.method, request.raw_path, headers, body))
        tail = request.match_info["tail"]
        if tail == "no-content":
            return web.Response(status=204)
        if tail == "not-modified":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        if tail == "redirect":
            return web.Response(status=307, headers={"Location": f"{request.url.origin()}/moved"})
        response = web.Response(
            body=b"x" * 1234, content_type="application/octet-stream", headers={"ETag": '"v1"'}
        )
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        response.headers.add("X-Custom", "one")
        response.headers.add("X-Custom", "two")
        return response


@pytest.fixture
async def echo_url(aiohttp_server: ServerFactory) -> tuple[_Echo, str]:
    echo = _Echo()
    server = await aiohttp_server(echo.app())
    return echo, f"http://127.0.0.1:{server.port}"


async def test_head_answers_with_the_length_get_would_have(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    _, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    get = await client.get("/files/a")
    assert get.headers["Content-Length"] == "1234"
    head = await client.head("/files/a")
    assert head.status == 200
    assert head.headers["Content-Length"] == "1234"


async def test_a_redirect_points_at_the_gateway_not_the_backend(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    _, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    response = await client.get("/redirect", allow_redirects=False)
    assert response.status == 307
    location = response.headers["Location"]
    assert not location.startswith(url)  # the backend's own address, unreachable or a bypass
    assert location.endswith("/moved")


# Checks: encoded characters in the path and query reach the backend byte for byte.
async def test_encoded_paths_and_query_strings_are_forwarded_verbatim(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    echo, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    target = "/v1/files/a%2Fb%20c%3Fd%25+%E2%9C%93?x=1%262&y=a+b&z=%E2%9C%93&w=%2B&e="
    response = await client.get(target)
    assert response.status == 200
    assert echo.seen[-1][1] == target


# Checks: repeated request and response headers (two Set-Cookie, two X-Custom) all cross.
async def test_repeated_headers_cross_the_proxy_in_both_directions(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    echo, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    headers = [("X-Custom", "c1"), ("X-Custom", "c2")]
    response = await client.get("/files/a", headers=headers)
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers.getall("X-Custom") == ["one", "two"]
    assert echo.seen[-1][2]["x-custom"] == ["c1", "c2"]


# Checks: DELETE and a body-less GET pass through; 204 and 304 arrive without a body.
async def test_delete_204_and_304_pass_through(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    echo, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    deleted = await client.delete("/v1/files/f1")
    assert deleted.status == 200
    assert echo.seen[-1][0] == "DELETE"
    empty = await client.get("/no-content")
    assert empty.status == 204
    assert await empty.read() == b""
    cached = await client.get("/not-modified", headers={"If-None-Match": '"v1"'})
    assert cached.status == 304
    assert cached.headers["ETag"] == '"v1"'
    assert await cached.read() == b""


# -- failures mid-answer ---------------------------------------------------------------------------


async def test_a_non_sse_body_cut_mid_way_reaches_the_client_cut_too(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        # Ollama's native API streams NDJSON; the backend dies after two lines
        writer.write(
            _head("200 OK", "Content-Type: application/x-ndjson", "Transfer-Encoding: chunked")
        )
        writer.write(_chunk(b'{"message": {"content": "a"}}\n{"message": {"content": "b"}}\n'))

    backend = await raw_backend(script)
    client, _ = await make_gateway(policy_text([backend.url]))
    response = await client.post("/api/chat", json={"model": "m1", "messages": []})
    assert response.status == 200
    # a clean end of body would tell the client it has the whole answer
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_a_stream_silent_after_its_headers_reports_the_timeout_that_fired(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    stop = asyncio.Event()

    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(
            _head("200 OK", "Content-Type: text/event-stream", "Transfer-Encoding: chunked")
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


# Checks: a JSON answer cut before its Content-Length is a 502, and no output is charged.
async def test_json_answer_cut_mid_body_is_502_and_charges_no_output(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(_head("200 OK", "Content-Type: application/json", "Content-Length: 500"))
        writer.write(b'{"id": "c", "choices": [')

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 900})
    assert response.status == 502
    assert response.headers["x-kvgate-outcome"] == "upstream_error"
    await until(lambda: _tokens(metrics, "output") is not None)
    assert _tokens(metrics, "output") == 0


# Checks: a stream cut mid-event ends with an SSE error event; what was relayed is settled.
async def test_stream_cut_mid_event_ends_with_an_error_event(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(
            _head("200 OK", "Content-Type: text/event-stream", "Transfer-Encoding: chunked")
        )
        events = b"".join(
            b"data: " + json.dumps(_sse_chunk(i)).encode() + b"\n\n" for i in range(2)
        )
        writer.write(_chunk(events + b'data: {"id": "c", "cho'))

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    text = await response.text()
    assert "t1" in text
    assert text.endswith("\n\n")
    last = json.loads(text.rstrip("\n").rsplit("\n\n", 1)[-1].removeprefix("data: "))
    assert last["error"]["type"] == "upstream_error"
    await until(lambda: _outcomes(metrics, "upstream_error") == 1)
    assert _tokens(metrics, "output") == 2


# -- refunds ---------------------------------------------------------------------------------------


async def _remaining_tokens(client: object, **headers: str) -> int:
    """The tokens left in acme's bucket, as a one-token probe request reports them."""
    probe = await client.post(  # type: ignore[attr-defined]
        "/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={**ACME, **headers}
    )
    await probe.read()
    return int(probe.headers["x-ratelimit-remaining-tokens"])


# Checks: a client that hangs up before the first byte gets its token reservation back.
async def test_client_leaving_before_the_first_byte_is_refunded(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.hold_first_byte = True
    client, metrics = await make_gateway(policy_text([stub_url], acme_limits=TOKENS_LIMIT))
    body = {**CHAT, "max_tokens": 900}
    request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body, headers=ACME))
    await until(lambda: bool(stub.requests))
    request.cancel()
    await asyncio.wait_for(stub.cancelled.wait(), 5)
    await until(lambda: _outcomes(metrics, "client_closed", "acme") == 1)
    stub.hold_first_byte = False
    assert await _remaining_tokens(client) > 900


# Checks: a request admission sheds (its queue deadline passed) gets its reservation back.
async def test_shed_request_is_refunded(make_gateway: MakeGateway) -> None:
    text = policy_text(["http://127.0.0.1:9"], acme_limits=TOKENS_LIMIT)
    client, _ = await make_gateway(text, wait_ready=False)
    body = {**CHAT, "max_tokens": 900}
    response = await client.post(
        "/v1/chat/completions", json=body, headers={**ACME, "x-request-timeout": "0.05"}
    )
    assert response.status == 503
    assert await _remaining_tokens(client, **{"x-request-timeout": "0.05"}) > 900


# Checks: a backend that drops the connection without answering: 502, reservation refunded.
async def test_backend_failing_before_answering_is_502_and_refunded(
    make_gateway: MakeGateway, raw_backend: Callable[[Script], Awaitable[RawBackend]]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        if json.loads(request.body)["max_tokens"] == 900:
            return  # closed without a byte of answer
        writer.write(_head("200 OK", "Content-Type: application/json", "Content-Length: 2"))
        writer.write(b"{}")

    backend = await raw_backend(script)
    client, _ = await make_gateway(policy_text([backend.url], acme_limits=TOKENS_LIMIT))
    body = {**CHAT, "max_tokens": 900}
    response = await client.post("/v1/chat/completions", json=body, headers=ACME)
    assert response.status == 502
    assert await _remaining_tokens(client) > 900


# -- time to first token ---------------------------------------------------------------------------


async def test_time_to_first_token_of_a_stream_is_measured_at_its_first_event(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    aiohttp_server: ServerFactory,
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
        await response.write(b"data: " + json.dumps(_sse_chunk(0)).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/health", _health)
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


# -- a charge the client abandoned -----------------------------------------------------------------


class _RemoteStore:
    """A networked store (Redis) seen from the gateway: the charge is applied when the command
    runs, and its reply comes back later (held here until `reply` is set)."""

    def __init__(self, inner: MemoryLimitStore) -> None:
        self.inner = inner
        self.applied = asyncio.Event()
        self.reply = asyncio.Event()

    async def acquire(self, specs: Sequence[BucketSpec], amounts: Sequence[float]) -> Verdict:
        verdict = self.inner.acquire_now(specs, amounts)
        self.applied.set()
        await self.reply.wait()
        return verdict

    @property
    def degraded(self) -> bool:
        return False

    def acquire_now(self, specs: Sequence[BucketSpec], amounts: Sequence[float]) -> None:
        return None

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        return False

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        self.inner.adjust_now(specs, deltas)

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        return self.inner.peek_now(specs)

    async def close(self) -> None:
        return None


async def test_a_charge_whose_client_left_during_the_store_round_trip_is_refunded(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=TOKENS_LIMIT))
    gw = client.app[GATEWAY]
    store = _RemoteStore(MemoryLimitStore(gw.clock))
    gw.live = dataclasses.replace(gw.live, store=store)
    specs = gw.live.policy.buckets("acme", "m1")
    server = client.server.runner.server  # type: ignore[union-attr]
    assert server is not None
    body = {**CHAT, "max_tokens": 900}
    request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body, headers=ACME))
    await asyncio.wait_for(store.applied.wait(), 5)
    connections = len(server.connections)
    request.cancel()  # the client hangs up while the store's reply is on its way
    with contextlib.suppress(asyncio.CancelledError):
        await request
    # the server drops a connection once its handler has ended: the gateway has given up on it
    await until(lambda: len(server.connections) < connections)
    store.reply.set()
    assert not stub.requests  # it never reached a backend: everything but the request is owed
    await until(lambda: store.inner.peek_now(specs)[0] > 900)


# -- a slow client --------------------------------------------------------------------------------


async def test_a_client_reading_slowly_is_not_counted_as_an_idle_backend(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    event = b"data: " + json.dumps(_sse_chunk(0)).encode() + b"\n\n"
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
    app.router.add_get("/health", _health)
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
    await until(lambda: _outcomes(metrics, "ok") == 1)
    assert _outcomes(metrics, "upstream_timeout") == 1  # the idle backend's only
