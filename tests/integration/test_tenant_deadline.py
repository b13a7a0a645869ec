"""A tenant's own ``max_wait`` is its requests' queue deadline in place of the policy's: an
interactive tenant is refused at once where the policy would let it wait its turn."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

ACME = {"Authorization": "Bearer sk-acme"}
# 20 tokens a second, 100 at most: each request below reserves 5 + 4 prompt tokens + 64 output
WAITING = "      - {unit: tokens, rate: 1200/min, burst: 100, wait: true}"


def _chat() -> dict[str, object]:
    return {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}


@pytest.mark.parametrize(("tenant_wait", "served"), [(None, True), ("0.5s", False)])
async def test_the_tenants_max_wait_replaces_the_policys(
    make_gateway: MakeGateway,
    stub: StubBackend,
    stub_url: str,
    tenant_wait: str | None,
    served: bool,
) -> None:
    limits = WAITING if tenant_wait is None else f"{WAITING}\n    max_wait: {tenant_wait}"
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=limits))
    stub.completion_tokens = 64  # the reservation is used: nothing is refunded between them
    assert (await client.post("/v1/chat/completions", json=_chat(), headers=ACME)).status == 200
    # the next one takes a turn that begins at once and ends in about 2 s: it waits
    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=_chat(), headers=ACME))
    await asyncio.sleep(0.2)
    # a third one's turn begins in about 2 s: within the policy's 5 s, past the tenant's 0.5 s
    third = await client.post("/v1/chat/completions", json=_chat(), headers=ACME)
    if served:
        assert third.status == 200, await third.text()
    else:
        assert third.status == 429
        assert float(third.headers["retry-after-ms"]) > 500
    assert (await waiting).status == 200
