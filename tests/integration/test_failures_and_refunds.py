"""Backends failing mid-answer and requests that end before their answer: what the client sees
(a cut body, a 502, an SSE error event) and that the reservation is settled or refunded."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.state import GATEWAY
from gateway.store.memory import MemoryLimitStore
from tests.integration.conftest import MakeGateway, policy_text, until
from tests.integration.rawbackend import MakeRawBackend, RawRequest, chunk, head, sse_chunk
from tests.integration.stub import StubBackend
from tests.integration.traffic import (
    ACME,
    CHAT,
    TOKENS_LIMIT,
    HeldStore,
    requests_counted,
    tokens_counted,
)

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]
JSON = "Content-Type: application/json"


async def _remaining_tokens(client: Client, **headers: str) -> int:
    """The tokens left in acme's bucket, as a one-token probe request reports them."""
    probe = await client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={**ACME, **headers}
    )
    await probe.read()
    return int(probe.headers["x-ratelimit-remaining-tokens"])


# -- failures mid-answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        # Ollama's native API streams NDJSON; the backend dies after two lines
        (
            "/api/chat",
            "application/x-ndjson",
            b'{"message": {"content": "a"}}\n{"message": {"content": "b"}}\n',
        ),
        # a chunked JSON answer (no length to check it against) cut inside its object
        ("/v1/chat/completions", "application/json", b'{"id": "c", "choices": [{"index'),
    ],
    ids=["ndjson", "chunked-json"],
)
async def test_a_body_without_a_length_cut_mid_way_reaches_the_client_cut_too(
    make_gateway: MakeGateway,
    raw_backend: MakeRawBackend,
    path: str,
    content_type: str,
    body: bytes,
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(head("200 OK", f"Content-Type: {content_type}", "Transfer-Encoding: chunked"))
        writer.write(chunk(body))

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url]))
    response = await client.post(path, json={"model": "m1", "messages": []})
    assert response.status == 200
    # a clean end of body would tell the client it has the whole answer
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await until(lambda: requests_counted(metrics, "upstream_error") == 1)
    assert tokens_counted(metrics, "output") == 0


@pytest.mark.parametrize(
    ("cut", "output_counted"),
    [
        (b"", None),  # no answer at all: there is no usage to count
        (head("200 OK", JSON, "Content-Length: 500"), 0),
        (head("200 OK", JSON, "Content-Length: 500") + b'{"id": "c", "choices": [', 0),
    ],
    ids=["before-the-status-line", "after-the-headers", "mid-body"],
)
async def test_a_json_answer_cut_short_is_502_charges_no_output_and_is_refunded(
    make_gateway: MakeGateway,
    raw_backend: MakeRawBackend,
    cut: bytes,
    output_counted: float | None,
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        if json.loads(request.body)["max_tokens"] == 900:
            writer.write(cut)  # and the connection closes
            return
        writer.write(head("200 OK", JSON, "Content-Length: 2") + b"{}")

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url], acme_limits=TOKENS_LIMIT))
    body = {**CHAT, "max_tokens": 900}
    response = await client.post("/v1/chat/completions", json=body, headers=ACME)
    assert response.status == 502
    assert response.headers["x-kvgate-outcome"] == "upstream_error"
    await until(lambda: requests_counted(metrics, "upstream_error", "acme") == 1)
    assert tokens_counted(metrics, "output", "acme") == output_counted
    assert await _remaining_tokens(client) > 900


async def test_stream_cut_mid_event_ends_with_an_error_event(
    make_gateway: MakeGateway, raw_backend: MakeRawBackend
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(
            head("200 OK", "Content-Type: text/event-stream", "Transfer-Encoding: chunked")
        )
        events = b"".join(b"data: " + json.dumps(sse_chunk(i)).encode() + b"\n\n" for i in range(2))
        writer.write(chunk(events + b'data: {"id": "c", "cho'))

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    text = await response.text()
    assert "t1" in text
    assert text.endswith("\n\n")
    last = json.loads(text.rstrip("\n").rsplit("\n\n", 1)[-1].removeprefix("data: "))
    assert last["error"]["type"] == "upstream_error"
    await until(lambda: requests_counted(metrics, "upstream_error") == 1)
    assert tokens_counted(metrics, "output") == 2  # what was relayed is settled


# -- refunds ---------------------------------------------------------------------------------------


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
    await until(lambda: requests_counted(metrics, "client_closed", "acme") == 1)
    stub.hold_first_byte = False
    assert await _remaining_tokens(client) > 900


async def test_shed_request_is_refunded(make_gateway: MakeGateway) -> None:
    # no backend ever becomes ready: admission sheds the request when its queue deadline passes
    text = policy_text(["http://127.0.0.1:9"], acme_limits=TOKENS_LIMIT)
    client, _ = await make_gateway(text, wait_ready=False)
    body = {**CHAT, "max_tokens": 900}
    response = await client.post(
        "/v1/chat/completions", json=body, headers={**ACME, "x-request-timeout": "0.05"}
    )
    assert response.status == 503
    assert await _remaining_tokens(client, **{"x-request-timeout": "0.05"}) > 900


async def test_a_charge_whose_client_left_during_the_store_round_trip_is_refunded(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=TOKENS_LIMIT))
    gw = client.app[GATEWAY]
    store = HeldStore(MemoryLimitStore(gw.clock))
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
