"""JSON answers as real servers frame them (chunked, after an interim answer, without a length,
larger than the gateway buffers) settle to the usage they carry; an error answer is charged no
output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.integration.conftest import MakeGateway, policy_text, until
from tests.integration.rawbackend import MakeRawBackend, RawRequest, chunk, head
from tests.integration.traffic import ACME, CHAT, TOKENS_LIMIT, health, tokens_counted

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., Awaitable[TestServer]]
JSON = "Content-Type: application/json"
ANSWER = {
    "id": "c",
    "object": "chat.completion",
    "model": "m1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 5},
}


def _with_length(data: bytes) -> bytes:
    return head("200 OK", JSON, f"Content-Length: {len(data)}") + data


def _chunked(data: bytes) -> bytes:
    # Go servers (Ollama) chunk any answer larger than their 2 KiB write buffer
    chunks = chunk(data[:20]) + chunk(data[20:]) + b"0\r\n\r\n"
    return head("200 OK", JSON, "Transfer-Encoding: chunked") + chunks


def _after_early_hints(data: bytes) -> bytes:
    # a 103 Early Hints interim answer before the real one is skipped, not relayed as final
    return b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + _with_length(data)


def _until_close(data: bytes) -> bytes:
    # HTTP/1.1 without a length or chunking: the body ends when the connection does
    return head("200 OK", JSON) + data


@pytest.mark.parametrize(
    "framing",
    [_with_length, _chunked, _after_early_hints, _until_close],
    ids=["content-length", "chunked", "after-103", "until-close"],
)
async def test_a_json_answer_settles_to_its_usage_however_it_is_framed(
    make_gateway: MakeGateway, raw_backend: MakeRawBackend, framing: Callable[[bytes], bytes]
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(framing(json.dumps(ANSWER).encode()))

    backend = await raw_backend(script)
    client, metrics = await make_gateway(policy_text([backend.url], acme_limits=TOKENS_LIMIT))
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 900}, headers=ACME
    )
    assert response.status == 200
    assert await response.json() == ANSWER
    await until(lambda: tokens_counted(metrics, "output", "acme") is not None)
    assert tokens_counted(metrics, "output", "acme") == 5


async def test_json_answer_over_the_buffer_limit_settles_to_its_usage(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory
) -> None:
    async def embeddings(request: web.Request) -> web.Response:
        await request.read()
        vector = [0.125] * (9 * 1024 * 1024 // 6)  # ~9 MiB of JSON, over the 8 MiB buffer
        body = {"object": "list", "data": [{"embedding": vector}], "usage": {"prompt_tokens": 777}}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/embeddings", embeddings)
    server = await aiohttp_server(app)
    client, metrics = await make_gateway(policy_text([f"http://127.0.0.1:{server.port}"]))
    response = await client.post("/v1/embeddings", json={"model": "m1", "input": "hello"})
    assert response.status == 200
    await response.read()
    await until(lambda: tokens_counted(metrics, "input") is not None)
    assert tokens_counted(metrics, "input") == 777


@pytest.mark.parametrize("status", [400, 500])
async def test_a_backend_error_answer_is_charged_no_output_tokens(
    make_gateway: MakeGateway, aiohttp_server: ServerFactory, status: int
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        error = {"error": {"message": "bad", "type": "BadRequestError", "code": status}}
        return web.json_response(error, status=status)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", refuse)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    client, metrics = await make_gateway(policy_text([url], acme_limits=TOKENS_LIMIT))
    body = {**CHAT, "max_tokens": 900}
    response = await client.post("/v1/chat/completions", json=body, headers=ACME)
    assert response.status == status  # the backend's answer is passed through
    assert (await response.json())["error"]["message"] == "bad"
    await until(lambda: tokens_counted(metrics, "output", "acme") is not None)
    assert tokens_counted(metrics, "output", "acme") == 0
