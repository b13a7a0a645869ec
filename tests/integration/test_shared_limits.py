"""Limits shared by gateway replicas through a real Redis, and what happens when it is down."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.admin import build_admin_app
from gateway.app import build_app
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from tests.integration.conftest import policy_text

pytestmark = pytest.mark.integration

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
ACME = {"Authorization": "Bearer sk-acme"}
Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def _with_store(text: str, store: str) -> str:
    return text.replace("version: 1\n", f"version: 1\nstore: {store}\n", 1)


async def _replica(aiohttp_client: ClientFactory, text: str) -> Client:
    return await aiohttp_client(build_app(compile_policy(load_text(text))))


@pytest.mark.redis
async def test_replicas_share_one_budget_through_redis(
    redis_url: str,
    stub_url: str,
    aiohttp_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACME_KEY", "sk-acme")
    prefix = f"test-{secrets.token_hex(4)}"
    limits = "      - {unit: requests, rate: 1/min, burst: 3}"
    store = f"{{kind: redis, url: '{redis_url}', prefix: {prefix}, on_error: deny}}"
    text = _with_store(policy_text([stub_url], acme_limits=limits), store)
    one, two = await _replica(aiohttp_client, text), await _replica(aiohttp_client, text)
    try:
        statuses = []
        for client in (one, two, one, two):
            response = await client.post("/v1/chat/completions", json=CHAT, headers=ACME)
            statuses.append(response.status)
        assert statuses == [200, 200, 200, 429]
    finally:
        r = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in r.scan_iter(match=f"*{prefix}*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("on_error", "status"), [("deny", 503), ("allow", 200), ("local", 200)])
async def test_redis_outage_follows_the_policy(
    on_error: str,
    status: int,
    stub_url: str,
    aiohttp_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACME_KEY", "sk-acme")
    store = f"{{kind: redis, url: 'redis://127.0.0.1:{_closed_port()}/0', on_error: {on_error}}}"
    client = await _replica(aiohttp_client, _with_store(policy_text([stub_url]), store))
    response = await client.post("/v1/chat/completions", json=CHAT, headers=ACME)
    assert response.status == status
    if status == 503:
        assert (await response.json())["error"]["code"] == "store_unavailable"
    ops = await aiohttp_client(build_admin_app(client.app))
    metrics = await (await ops.get("/metrics")).text()
    assert "kvgate_store_degraded 1.0" in metrics
