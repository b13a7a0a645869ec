"""Bodies over ``server.limits`` are refused with a 400 naming the limit, before the full parse,
and never reach the backend."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

MANY = b'{"model": "m1", "messages": [' + b",".join([b"{}"] * 100_000) + b"]}"
DEEP = b'{"model": "m1", "messages": [{"role": "user", "content": ' + b"[" * 70 + b"]" * 70 + b"}]}"
LONG = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()


# Checks: each limit is named in its 400 (code limit_exceeded) and nothing is forwarded.
@pytest.mark.parametrize(
    ("body", "limit"),
    [(MANY, "server.limits.messages"), (DEEP, "server.limits.depth"), (LONG, "part_chars")],
    ids=["messages", "depth", "part_chars"],
)
async def test_bodies_over_a_limit_are_400_naming_it(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str, body: bytes, limit: str
) -> None:
    text = policy_text([stub_url]).replace(
        "  max_body: 64KiB\n", "  max_body: 2MiB\n  limits: {part_chars: 4000}\n"
    )
    client, _ = await make_gateway(text)
    response = await client.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "limit_exceeded"
    assert limit in error["message"]
    assert not stub.requests
