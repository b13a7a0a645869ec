"""Every API the gateway costs, end to end through real clients (the official openai and
anthropic SDKs, aiohttp) to a stub backend that speaks each API on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.metrics import Metrics
from gateway.proxy.apis import routes
from gateway.state import GATEWAY
from tests.integration.api_stub import ApiStub
from tests.integration.conftest import MakeGateway, policy_text, until
from tests.integration.traffic import requests_total

ACME = {"Authorization": "Bearer sk-acme"}
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def api() -> ApiStub:
    return ApiStub()


@pytest.fixture
async def api_url(api: ApiStub, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    server = await aiohttp_server(api.app())
    return f"http://127.0.0.1:{server.port}"


def _tokens(metrics: Metrics, tenant: str = "acme") -> float:
    total = 0.0
    for kind in ("input", "output"):
        labels = {"tenant": tenant, "model": "m1", "kind": kind}
        total += metrics.registry.get_sample_value("kvgate_tokens_total", labels) or 0.0
    return total


def _outcomes(metrics: Metrics, outcome: str) -> float:
    return requests_total(metrics, tenant="acme", model="m1", outcome=outcome) or 0.0


def _with_server(text: str, line: str) -> str:
    return text.replace("  anonymous_tenant: anon\n", f"  anonymous_tenant: anon\n  {line}\n")


async def test_openai_sdk_responses_settle_from_the_usage_block_and_the_completed_event(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    client, metrics = await make_gateway(policy_text([api_url]))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-acme", max_retries=0)
    answer = await sdk.responses.create(model="m1", input="hello there", max_output_tokens=8)
    assert answer.output_text == "t" * 8
    assert answer.usage is not None
    await until(lambda: _tokens(metrics) == sum(api.reported[0]))
    stream = await sdk.responses.create(
        model="m1", input=[{"role": "user", "content": "hi"}], max_output_tokens=5, stream=True
    )
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    await until(lambda: _tokens(metrics) == sum(map(sum, api.reported)))
    await sdk.close()


async def test_anthropic_sdk_streams_and_the_stream_settles_its_usage(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    client, metrics = await make_gateway(policy_text([api_url]))
    sdk = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="sk-acme")
    stream = await sdk.messages.create(
        model="m1",
        max_tokens=7,
        system="be brief",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
    )
    text = ""
    async for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
    assert text == "t" * 7
    prompt, output = api.reported[0]
    await until(lambda: _tokens(metrics) == prompt + output)
    message = await sdk.messages.create(
        model="m1", max_tokens=3, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.usage.output_tokens == 3
    await sdk.close()


async def test_anthropic_sdk_retries_kvgates_429_after_its_retry_after(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    limits = "      - {unit: requests, rate: 2/s, burst: 1}"
    client, metrics = await make_gateway(policy_text([api_url], acme_limits=limits))
    sdk = anthropic.AsyncAnthropic(
        base_url=str(client.make_url("")), api_key="sk-acme", max_retries=3
    )
    body: dict[str, Any] = {
        "model": "m1",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "x"}],
    }
    async with asyncio.timeout(10):
        await sdk.messages.create(**body)
        second = await sdk.messages.create(**body)  # refused, waits ~0.5 s, retried, served
    assert second.content[0].type == "text"
    assert _outcomes(metrics, "rate_limited") >= 1
    assert [path for path, _ in api.seen] == ["/v1/messages", "/v1/messages"]
    refused = await client.post("/v1/messages", json=body, headers={"x-api-key": "sk-acme"})
    assert refused.status == 429
    assert float(refused.headers["retry-after-ms"]) <= 1000
    error = await refused.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "rate_limit_error"
    await sdk.close()


async def test_anthropic_sdk_retries_529_overload_and_reports_it(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    # An unreachable store under `on_error: deny` sheds every request as overloaded.
    text = policy_text([api_url]).replace(
        "version: 1\n",
        "version: 1\nstore: {kind: redis, url: 'redis://127.0.0.1:1/0', on_error: deny}\n",
    )
    client, metrics = await make_gateway(text)
    sdk = anthropic.AsyncAnthropic(
        base_url=str(client.make_url("")), api_key="sk-acme", max_retries=2
    )
    async with asyncio.timeout(15):
        with pytest.raises(anthropic.APIStatusError) as caught:
            await sdk.messages.create(
                model="m1", max_tokens=2, messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.status_code == 529
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "overloaded_error"
    assert _outcomes(metrics, "store_error") == 3  # the first try and two retries
    assert api.seen == []
    await sdk.close()


async def test_anthropic_path_refusals_use_anthropic_errors(
    make_gateway: MakeGateway, api_url: str
) -> None:
    client, _ = await make_gateway(policy_text([api_url]))
    sdk = anthropic.AsyncAnthropic(
        base_url=str(client.make_url("")), api_key="wrong", max_retries=0
    )
    with pytest.raises(anthropic.AuthenticationError):
        await sdk.messages.create(
            model="m1", max_tokens=2, messages=[{"role": "user", "content": "x"}]
        )
    missing = await client.post("/v1/messages", json={"model": "m1", "messages": []})
    assert missing.status == 400
    assert (await missing.json())["error"]["type"] == "invalid_request_error"
    counted = await client.post("/v1/messages/count_tokens", json={"model": "nope", "messages": []})
    assert (await counted.json())["error"]["type"] == "not_found_error"
    await sdk.close()


MIX: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/chat/completions",
        {"model": "m1", "max_tokens": 16, "messages": [{"role": "user", "content": "c" * 120}]},
    ),
    (
        "/v1/chat/completions",
        {
            "model": "m1",
            "max_tokens": 16,
            "stream": True,
            "messages": [{"role": "user", "content": "c" * 120}],
        },
    ),
    ("/v1/completions", {"model": "m1", "max_tokens": 16, "prompt": "p" * 120}),
    ("/v1/responses", {"model": "m1", "max_output_tokens": 16, "input": "r" * 120}),
    (
        "/v1/responses",
        {"model": "m1", "stream": True, "input": [{"role": "user", "content": "r" * 120}]},
    ),
    (
        "/v1/messages",
        {"model": "m1", "max_tokens": 16, "messages": [{"role": "user", "content": "a" * 120}]},
    ),
    (
        "/v1/messages",
        {
            "model": "m1",
            "max_tokens": 16,
            "stream": True,
            "messages": [{"role": "user", "content": "a" * 120}],
        },
    ),
    (
        "/api/chat",
        {
            "model": "m1",
            "options": {"num_predict": 16},
            "messages": [{"role": "user", "content": "o" * 120}],
        },
    ),
    ("/api/generate", {"model": "m1", "stream": False, "prompt": "o" * 120}),
    ("/completion", {"model": "m1", "n_predict": 16, "stream": True, "prompt": "l" * 120}),
    ("/generate", {"model": "m1", "inputs": "g" * 120, "parameters": {"max_new_tokens": 16}}),
    (
        "/generate_stream",
        {"model": "m1", "inputs": "g" * 120, "parameters": {"max_new_tokens": 16}},
    ),
    ("/generate", {"model": "m1", "text": "s" * 120, "sampling_params": {"max_new_tokens": 16}}),
    ("/v1/rerank", {"model": "m1", "query": "q" * 20, "documents": ["d" * 100, "e" * 100]}),
    ("/v1/custom", {"model": "m1", "payload": "u" * 120}),
]


async def test_one_tenants_token_budget_holds_across_every_endpoint(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    # 6,000 tokens an hour (about 1.7 a second of refill): the budget is the burst.
    limits = "      - {unit: tokens, rate: 6000/h}"
    client, metrics = await make_gateway(policy_text([api_url], acme_limits=limits))
    loop = asyncio.get_running_loop()
    started = loop.time()
    refused: set[str] = set()
    served = 0
    for _ in range(30):  # rounds until every endpoint is refused (about 7 here)
        if len(refused) == len(MIX):
            break
        for i, (path, body) in enumerate(MIX):
            response = await client.post(path, json=body, headers=ACME)
            await response.read()
            if response.status == 429:
                refused.add(f"{i}")
            else:
                assert response.status == 200, (path, await response.text())
                refused.discard(f"{i}")
                served += 1
    budget = 6000 + 6000 / 3600 * (loop.time() - started)
    assert len(api.reported) == served
    settled = _tokens(metrics)
    print(f"settled {settled:.0f} tokens of a budget of {budget:.0f} in {served} requests")
    assert 0.95 * budget <= settled <= 1.05 * budget, (settled, budget, served)
    assert len(refused) == len(MIX)  # every endpoint ended refused: none goes around the limit
    assert served >= 2 * len(MIX)
    refusal = await client.post("/v1/messages", json=MIX[5][1], headers=ACME)
    assert (await refusal.json())["error"]["type"] == "rate_limit_error"


async def test_a_model_alias_is_rewritten_upstream_and_answered_with_its_public_name(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    client, _ = await make_gateway(
        policy_text([api_url], backend_extra=", served_name: org/served-7b")
    )
    body = {"model": "m1", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
    answer = await (await client.post("/v1/chat/completions", json=body)).json()
    assert answer["model"] == "m1"
    stream = await (await client.post("/v1/chat/completions", json={**body, "stream": True})).text()
    assert stream.count('"model": "m1"') == 3
    assert "served-7b" not in stream
    ndjson = await (
        await client.post("/api/chat", json={**body, "options": {"num_predict": 2}})
    ).text()
    assert [json.loads(line)["model"] for line in ndjson.splitlines()] == ["m1"] * 3
    assert {model for _, model in api.seen} == {"org/served-7b"}
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["m1"]


async def test_a_lease_is_released_when_preparing_the_upstream_body_fails(
    make_gateway: MakeGateway, api: ApiStub, api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = await make_gateway(
        policy_text([api_url], backend_extra=", served_name: org/served-7b")
    )

    def broken(body: bytes, name: str) -> bytes:
        raise RuntimeError("rename failed")

    monkeypatch.setattr(routes, "with_model", broken)
    body = {"model": "m1", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status == 500
    assert (await answer.json())["error"]["message"]
    state = client.app[GATEWAY].admitter.snapshot()["m1"]
    assert isinstance(state, dict)
    assert [(b["inflight"], b["reserved_bytes"]) for b in state["backends"]] == [(0, 0)]
    assert api.seen == []


async def test_unknown_endpoints_follow_the_policy(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    limits = "      - {unit: tokens, rate: 100000/day}"
    body = {"model": "m1", "payload": "u" * 400}
    client, metrics = await make_gateway(policy_text([api_url], acme_limits=limits))
    estimated = await client.post("/v1/custom", json=body, headers=ACME)
    assert estimated.status == 200
    # charged at the body's length (about 105 tokens) and the model's default output (64)
    assert 100000 - int(estimated.headers["x-ratelimit-remaining-tokens"]) >= 150
    labels = {"tenant": "acme", "model": "m1", "rule": "estimate"}
    assert metrics.registry.get_sample_value("kvgate_uncosted_requests_total", labels) == 1
    freeing = _with_server(policy_text([api_url], acme_limits=limits), "unknown_endpoints: free")
    client, metrics = await make_gateway(freeing)
    free = await client.post("/v1/custom", json=body, headers=ACME)
    assert int(free.headers["x-ratelimit-remaining-tokens"]) == 100000  # nothing reserved
    labels = {"tenant": "acme", "model": "m1", "rule": "free"}
    assert metrics.registry.get_sample_value("kvgate_uncosted_requests_total", labels) == 1
    denying = _with_server(policy_text([api_url], acme_limits=limits), "unknown_endpoints: deny")
    client, _ = await make_gateway(denying)
    denied = await client.post("/v1/custom", json=body, headers=ACME)
    assert denied.status == 404
    assert "unknown_endpoints: deny" in (await denied.json())["error"]["message"]
    assert (await client.post("/tokenize", json={"model": "m1", "prompt": "x"})).status == 200


async def test_previous_response_id_is_costed_from_what_the_gateway_settled(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    limits = "      - {unit: tokens, rate: 1000000/day}"
    client, metrics = await make_gateway(policy_text([api_url], acme_limits=limits))
    body = {"model": "m1", "input": "hello", "max_output_tokens": 4}
    first = await (await client.post("/v1/responses", json=body, headers=ACME)).json()
    await until(lambda: _tokens(metrics) == sum(api.reported[0]))
    plain = await client.post("/v1/responses", json=body, headers=ACME)
    await plain.read()
    await until(lambda: _tokens(metrics) == sum(map(sum, api.reported)))
    continued = await client.post(
        "/v1/responses", json={**body, "previous_response_id": first["id"]}, headers=ACME
    )
    await continued.read()
    gap = int(plain.headers["x-ratelimit-remaining-tokens"]) - int(
        continued.headers["x-ratelimit-remaining-tokens"]
    )
    # the plain request's settled usage, then the remembered first response (+ refill noise)
    expected = sum(api.reported[1]) + sum(api.reported[0])
    assert abs(gap - expected) <= 25  # the body itself grew by the id's characters


async def test_negative_usage_neither_refunds_nor_makes_counters_go_down(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    api.negative_usage = True
    limits = "      - {unit: tokens, rate: 100000/day}"
    client, metrics = await make_gateway(policy_text([api_url], acme_limits=limits))
    body = {"model": "m1", "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 40}]}
    for path, payload in (
        ("/v1/chat/completions", body),
        ("/v1/messages", body),
        ("/api/chat", body),
    ):
        response = await client.post(path, json=payload, headers=ACME)
        assert response.status == 200
        await response.read()
    await until(lambda: _outcomes(metrics, "ok") == 3)
    assert _tokens(metrics) > 0
    after = await client.post("/v1/chat/completions", json=body, headers=ACME)
    # the three settled at their estimates: nothing came back beyond what they reserved
    assert int(after.headers["x-ratelimit-remaining-tokens"]) < 100000 - 4 * 10


async def test_an_event_that_never_ends_is_cut_with_an_error_event(
    make_gateway: MakeGateway, api: ApiStub, api_url: str
) -> None:
    api.unterminated = 3 << 20
    client, _ = await make_gateway(policy_text([api_url]))
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with asyncio.timeout(10):
        text = await (await client.post("/v1/chat/completions", json=body)).text()
        assert text.startswith("data: {")
        assert "without ending an event" in text
        anthropic_text = await (
            await client.post("/v1/messages", json={**body, "max_tokens": 2})
        ).text()
        assert anthropic_text.startswith("event: error\ndata: ")
        assert (await client.get("/healthz")).status == 200
