"""The gateway as an operator and an SDK user see it: hot reload, shadow mode, the official
OpenAI SDK's own retries, metrics and the admin view. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.metrics import Metrics
from gateway.policy.watcher import read_policy
from tests.integration.conftest import MakeAdmin, MakeGateway, policy_text, until
from tests.integration.stub import StubBackend
from tests.integration.traffic import requests_total

pytestmark = pytest.mark.integration

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
ACME = {"Authorization": "Bearer sk-acme"}


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    if name == "kvgate_requests_total":  # over every status
        return requests_total(metrics, **labels) or 0.0
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_shadow_tenant_is_counted_but_never_refused(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    text = policy_text([stub_url], acme_limits="      - {unit: requests, rate: 1/min, burst: 1}")
    text = text.replace("  acme:\n", "  acme:\n    shadow: true\n")
    client, metrics = await make_gateway(text)
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=CHAT, headers=ACME)
        assert response.status == 200
    labels = {"tenant": "acme", "model": "m1"}
    assert _sample(metrics, "kvgate_requests_total", **labels, outcome="shadow_limited") == 2


async def test_openai_sdk_backs_off_on_429_by_itself_and_then_succeeds(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    limits = "      - {unit: requests, rate: 2/s, burst: 1}"
    client, metrics = await make_gateway(policy_text([stub_url], acme_limits=limits))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-acme", max_retries=3)
    async with sdk:
        first = await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        second = await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert first.usage.completion_tokens == second.usage.completion_tokens == 5
    assert len(stub.requests) == 2  # the refused attempt never reached the backend
    labels = {"tenant": "acme", "model": "m1"}
    assert _sample(metrics, "kvgate_requests_total", **labels, outcome="rate_limited") >= 1


async def test_openai_sdk_streams_through_the_gateway(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-acme")
    async with sdk:
        stream = await sdk.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "t0 t1 t2 t3 t4 "


async def test_request_too_large_for_any_burst_is_told_not_to_retry(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    limits = "      - {unit: tokens, rate: 100/min}"
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=limits))
    body = {**CHAT, "max_tokens": 500}
    response = await client.post("/v1/chat/completions", json=body, headers=ACME)
    assert response.status == 429
    assert response.headers["x-should-retry"] == "false"
    assert "Retry-After" not in response.headers
    assert "can never pass" in (await response.json())["error"]["message"]


async def test_metrics_and_admin_state_describe_the_live_gateway(
    make_gateway: MakeGateway, stub_url: str, admin: MakeAdmin
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    ops = await admin(client)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    text = await (await ops.get("/metrics")).text()
    assert 'kvgate_requests_total{model="m1",outcome="ok",status="200",tenant="anon"} 1.0' in text
    assert f'kvgate_backend_phase{{backend="{stub_url}",model="m1",phase="ready"}} 1.0' in text
    assert 'kvgate_queue_depth{model="m1"} 0.0' in text
    assert "sk-" not in text
    state = await (await ops.get("/admin/state")).json()
    assert state["admission"]["m1"]["backends"][0]["phase"] == "ready"
    assert (await client.get("/healthz")).status == 200
    assert (await ops.get("/healthz")).status == 200
    # nothing internal on the proxy's listener
    for path in ("/metrics", "/admin/state", "/status"):
        assert (await client.get(path)).status == 404


async def test_policy_edits_reload_without_dropping_a_request_and_bad_ones_are_refused(
    tmp_path: Path,
    stub: StubBackend,
    stub_url: str,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    monkeypatch: pytest.MonkeyPatch,
    admin: MakeAdmin,
) -> None:
    monkeypatch.setenv("ACME_KEY", "sk-acme")
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text([stub_url]))
    policy, digest = read_policy(path)
    metrics = Metrics()
    client = await aiohttp_client(build_app(policy, metrics=metrics, watch=(path, digest)))
    ops = await admin(client)
    for _ in range(200):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.01)

    async def fingerprint() -> str:
        return str((await (await ops.get("/admin/state")).json())["policy"]["fingerprint"])

    async def reload(result: str) -> None:
        before = _sample(metrics, "kvgate_policy_reloads_total", result=result)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(
            lambda: _sample(metrics, "kvgate_policy_reloads_total", result=result) != before
        )

    stub.hold_first_byte = True
    in_flight = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: stub.requests)

    path.write_text(policy_text([stub_url]).replace("anonymous_tenant: anon", ""))
    await reload("ok")
    assert await fingerprint() != policy.fingerprint
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 401

    good = await fingerprint()
    path.write_text("version: 1\nmodels: {m1: {kv: {layers: 0}}}\n")
    await reload("error")
    assert await fingerprint() == good

    stub.release.set()
    response = await in_flight
    assert response.status == 200
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=ACME)).status == 200
