"""A policy reload never changes a request already on its way: it was charged under one policy
and is admitted and forwarded under that policy's deadline and timeouts."""

from __future__ import annotations

import asyncio

import pytest

from gateway.app import apply_policy
from gateway.backends.admitter import Lease
from gateway.core.pool import Ticket
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from gateway.state import GATEWAY
from gateway.store.memory import MemoryLimitStore
from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.stub import StubBackend
from tests.integration.traffic import HeldStore

pytestmark = pytest.mark.integration

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


async def test_a_reload_between_charge_and_forward_leaves_the_request_on_its_policy(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    old_text = policy_text([stub_url], first_byte="10s")
    client, _ = await make_gateway(old_text)
    app = client.app
    gw = app[GATEWAY]
    store = HeldStore(MemoryLimitStore(gw.clock))
    gw.live = type(gw.live)(policy=gw.live.policy, store=store, counters=gw.live.counters)
    tickets: list[Ticket] = []
    acquire = gw.admitter.acquire

    async def recording(ticket: Ticket) -> Lease:
        tickets.append(ticket)
        return await acquire(ticket)

    gw.admitter.acquire = recording  # type: ignore[method-assign]
    stub.hold_first_byte = True  # the backend answers only when the test lets it

    before = gw.clock.now()
    in_flight = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
    await asyncio.wait_for(store.applied.wait(), 5)
    # the reload: a first-byte timeout far shorter than the backend's delay, a short queue wait
    new_text = old_text.replace("first_byte: 10s", "first_byte: 100ms").replace(
        "max_wait: 5s", "max_wait: 200ms"
    )
    await apply_policy(app, compile_policy(load_text(new_text)))
    assert gw.live.policy.server.timeouts.first_byte_s == pytest.approx(0.1)
    store.reply.set()
    await asyncio.sleep(0.5)  # past the new policy's first-byte timeout
    stub.release.set()
    response = await asyncio.wait_for(in_flight, 10)
    assert response.status == 200, await response.text()
    # its queue deadline is the old policy's max_wait from its arrival, not the new one's
    assert tickets[0].deadline - before == pytest.approx(5.0, abs=0.5)

    stub.release.clear()
    later = await client.post("/v1/chat/completions", json=CHAT)
    assert later.status == 504  # a request that arrives after the reload runs on the new one
    assert tickets[1].deadline - tickets[0].deadline < 1.0
    stub.release.set()
