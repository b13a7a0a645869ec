"""Request bodies and headers on their way through the gateway: encodings, malformed bodies
refused before they reach a backend, forwarding headers, and hop-by-hop headers of the answer."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.rawbackend import MakeRawBackend, RawRequest, head
from tests.integration.stub import StubBackend
from tests.integration.traffic import CHAT

pytestmark = pytest.mark.integration


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
    make_gateway: MakeGateway, raw_backend: MakeRawBackend
) -> None:
    async def script(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(
            head(
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


async def test_bad_bodies_count_against_the_tenants_request_limit(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    limits = "      - {unit: requests, rate: 2/min, burst: 2}"
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=limits))
    acme = {"Authorization": "Bearer sk-acme", "Content-Type": "application/json"}
    statuses = []
    for _ in range(3):
        bad = await client.post("/v1/chat/completions", data=b"{not json", headers=acme)
        statuses.append(bad.status)
    # the first two are answered for what they are; the third is past the tenant's limit
    assert statuses == [400, 400, 429]
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    good = await client.post("/v1/chat/completions", json=chat, headers=acme)
    assert good.status == 429  # the bad ones spent what the tenant may send
    assert not stub.requests
