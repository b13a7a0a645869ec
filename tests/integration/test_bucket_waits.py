"""A limit with ``wait: true``: a request it would refuse waits for its turn instead, when that
turn comes before the request's queue deadline, and is then served; a later turn gets the 429."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.state import GATEWAY
from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

ACME = {"Authorization": "Bearer sk-acme"}
# 20 tokens a second, 100 at most: each request below reserves 5 + 4 prompt tokens + 64 output
WAITING = "      - {unit: tokens, rate: 1200/min, burst: 100, wait: true}"


def _chat() -> dict[str, object]:
    return {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}


async def test_a_request_a_waiting_limit_would_refuse_is_served_in_its_turn(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=WAITING))
    stub.completion_tokens = 64  # the reservation is used: nothing is refunded between them
    first = await client.post("/v1/chat/completions", json=_chat(), headers=ACME)
    assert first.status == 200
    started = time.monotonic()
    second = await client.post("/v1/chat/completions", json=_chat(), headers=ACME)
    waited = time.monotonic() - started
    assert second.status == 200, await second.text()
    assert waited > 1.0  # it waited for the bucket to refill, instead of a 429
    assert len(stub.requests) == 2


async def test_a_turn_after_the_deadline_is_refused_at_once(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=WAITING))
    stub.completion_tokens = 64
    assert (await client.post("/v1/chat/completions", json=_chat(), headers=ACME)).status == 200
    # the next one takes a turn that begins at once and ends in about 2 s: it waits
    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=_chat(), headers=ACME))
    await asyncio.sleep(0.2)
    short = {**ACME, "x-request-timeout": "0.5"}  # its turn would begin in about 2 s
    refused = await client.post("/v1/chat/completions", json=_chat(), headers=short)
    assert refused.status == 429
    assert float(refused.headers["retry-after-ms"]) > 500
    assert (await waiting).status == 200


async def test_a_client_that_leaves_while_waiting_is_refunded(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=WAITING))
    gw = client.app[GATEWAY]
    stub.completion_tokens = 64
    assert (await client.post("/v1/chat/completions", json=_chat(), headers=ACME)).status == 200
    specs = gw.live.policy.buckets("acme", "m1")
    store = gw.live.store
    before = (await store.peek(specs))[0]
    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=_chat(), headers=ACME))
    await asyncio.sleep(0.3)  # charged, and waiting for its turn
    assert (await store.peek(specs))[0] < before - 50
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    async def refunded() -> bool:
        return (await store.peek(specs))[0] >= before - 10

    for _ in range(100):
        if await refunded():
            break
        await asyncio.sleep(0.05)
    assert await refunded()
    assert len(stub.requests) == 1  # it never reached the backend
