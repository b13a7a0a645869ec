"""Fixtures for tests that run the gateway for real: a stub backend and a gateway in front of it,
both aiohttp servers on 127.0.0.1, and real HTTP clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import build_admin_app
from gateway.app import build_app
from gateway.metrics import Metrics
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from tests.integration.rawbackend import MakeRawBackend, RawBackend, Script
from tests.integration.stub import StubBackend

POLICY = """
version: 1
server:
  anonymous_tenant: anon
  allow_paths: [/v1/custom]  # a path without cost rules (server.unknown_endpoints)
  max_body: 64KiB
  timeouts: {{connect: 1s, first_byte: {first_byte}, idle: {idle}, total: 30s}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    default_max_tokens: 64
    backends:
{backends}
tenants:
  anon:
    limits: [{{unit: requests, rate: 1000/s}}]
  acme:
    keys: ["env:ACME_KEY"]
    limits:
{acme_limits}
admission:
  queue: {{max_wait: 5s}}
"""

MakeGateway = Callable[..., Awaitable[tuple[TestClient[web.Request, web.Application], Metrics]]]
Client = TestClient[web.Request, web.Application]
MakeAdmin = Callable[[Client], Awaitable[Client]]


def policy_text(
    backend_urls: list[str],
    *,
    first_byte: str = "10s",
    idle: str = "10s",
    acme_limits: str = "      - {unit: requests, rate: 1000/s}",
    backend_extra: str = "",
) -> str:
    backends = "\n".join(
        f"      - {{url: {url}, kv_capacity: 4GiB, signals: none, warmup: 0s, "
        f"probe_interval: 50ms{backend_extra}}}"
        for url in backend_urls
    )
    return POLICY.format(
        backends=backends, first_byte=first_byte, idle=idle, acme_limits=acme_limits
    )


@pytest.fixture
def stub() -> StubBackend:
    return StubBackend()


@pytest.fixture
async def stub_url(stub: StubBackend, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    server = await aiohttp_server(stub.app())
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def raw_backend() -> AsyncIterator[MakeRawBackend]:
    """Raw backends on 127.0.0.1 (``tests.integration.rawbackend``), closed after the test."""
    backends: list[RawBackend] = []

    async def make(script: Script) -> RawBackend:
        backend = RawBackend(script)
        await backend.start()
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        await backend.close()


@pytest.fixture
def make_gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    monkeypatch: pytest.MonkeyPatch,
) -> MakeGateway:
    monkeypatch.setenv("ACME_KEY", "sk-acme")
    monkeypatch.setenv("BACKEND_KEY", "sk-backend")

    async def make(
        text: str, *, wait_ready: bool = True
    ) -> tuple[TestClient[web.Request, web.Application], Metrics]:
        metrics = Metrics()
        app = build_app(compile_policy(load_text(text)), metrics=metrics)
        client = await aiohttp_client(app)
        if wait_ready:
            await _wait_ready(client)
        return client, metrics

    return make


@pytest.fixture
def admin(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> MakeAdmin:
    """A client of the admin listener of the gateway behind ``client`` (same live state)."""

    async def make(client: Client) -> Client:
        return await aiohttp_client(build_admin_app(client.app))

    return make


async def until(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Wait for state that another server changes; there is no event to await on it."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def until_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 20.0) -> None:
    """Wait for a gateway process at ``url`` to answer ``/readyz`` with 200."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                async with session.get(f"{url}/readyz") as ready:
                    if ready.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


async def _wait_ready(client: TestClient[web.Request, web.Application]) -> None:
    for _ in range(200):
        response = await client.get("/readyz")
        if response.status == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the gateway never saw a ready backend")
