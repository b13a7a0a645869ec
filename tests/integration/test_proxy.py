"""The proxy end to end: real backend and gateway servers on 127.0.0.1, real HTTP clients."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any

import pytest

from gateway.logs import AccessLog
from gateway.state import GATEWAY
from tests.integration.conftest import MakeGateway, policy_text, until
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_non_streaming_answer_keeps_status_body_and_headers(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    body = await response.json()
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5}
    assert response.headers["Content-Type"].startswith("application/json")
    assert "x-ratelimit-remaining-requests" in response.headers


async def test_stream_chunks_reach_the_client_while_the_backend_is_still_producing(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.hold_stream = True
    client, _ = await make_gateway(policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
    # The backend is blocked after its first chunk until we release it: the chunk got here first.
    assert not stub.release.is_set()
    assert b'"t0 "' in first
    stub.release.set()
    rest = await response.content.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_usage_chunk_asked_by_the_gateway_is_hidden_and_settles_tokens(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, metrics = await make_gateway(policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    text = await response.text()
    assert '"usage"' not in text
    upstream = json.loads(stub.requests[-1].body)
    assert upstream["stream_options"] == {"include_usage": True}
    await until(lambda: _sample(metrics, "kvgate_tokens_total", kind="output") == 5)


async def test_usage_chunk_is_passed_when_the_client_asked(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    ask = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    text = await (await client.post("/v1/chat/completions", json=ask)).text()
    assert '"usage": {"prompt_tokens": 7' in text


async def test_client_disconnect_cancels_the_upstream_request(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.hold_first_byte = True
    client, _ = await make_gateway(policy_text([stub_url]))
    request = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: bool(stub.requests))
    request.cancel()
    await asyncio.wait_for(stub.cancelled.wait(), 5)


async def test_first_byte_timeout_is_504(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.hold_first_byte = True
    client, _ = await make_gateway(policy_text([stub_url], first_byte="200ms"))
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 504
    error = (await response.json())["error"]
    assert error["code"] == "upstream_timeout"
    assert "first byte" in error["message"]


async def test_idle_timeout_ends_the_stream_with_an_error_event(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.hold_stream = True
    client, _ = await make_gateway(policy_text([stub_url], idle="200ms"))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status == 200
    text = await response.text()
    assert "t0" in text
    assert "upstream idle timeout after 0.2s" in text


async def test_connect_failure_is_retried_on_another_backend(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([_closed_port_url(), stub_url]))
    for _ in range(4):  # whichever backend the router picks first, every request succeeds
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status == 200
    assert len(stub.requests) == 4


async def test_a_backend_that_never_came_up_sheds_with_its_loading_estimate(
    make_gateway: MakeGateway,
) -> None:
    client, _ = await make_gateway(policy_text([_closed_port_url()]), wait_ready=False)
    assert (await client.get("/readyz")).status == 503
    # a load balancer in front of gateways keeps this one: it holds or sheds with Retry-After
    gateway_only = await client.get("/readyz?scope=gateway")
    assert gateway_only.status == 200
    assert (await gateway_only.json())["backend_ready"] is False
    response = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"x-request-timeout": "0.2"}
    )
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["type"] == "overloaded"
    assert int(response.headers["Retry-After"]) >= 1


async def test_client_keys_never_reach_the_backend_and_forwarding_headers_are_set(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    text = policy_text([stub_url], backend_extra=", api_key: 'env:BACKEND_KEY'")
    client, _ = await make_gateway(text)
    response = await client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            "Authorization": "Bearer sk-acme",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "drop me",
            "X-Custom": "keep me",
            "Proxy-Authorization": "Basic abc",
            "Accept-Encoding": "gzip, br",
        },
        expect100=True,
    )
    assert response.status == 200
    seen = {k.lower(): v for k, v in stub.requests[-1].headers.items()}
    # The body is read whole before forwarding: nothing to continue. And the answer must come
    # back uncompressed, for the gateway to read its usage block.
    assert "expect" not in seen
    assert seen["accept-encoding"] == "identity"
    assert seen["authorization"] == "Bearer sk-backend"
    assert "sk-acme" not in json.dumps(seen)
    assert "x-secret-hop" not in seen
    assert "proxy-authorization" not in seen
    assert seen["x-custom"] == "keep me"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, None),
        ({"json": {"messages": []}}, 400, None),
        ({"json": {**CHAT, "model": "nope"}}, 404, "model_not_found"),
        ({"json": CHAT, "headers": {"Authorization": "Bearer wrong"}}, 401, "invalid_api_key"),
        ({"data": b"x" * (65 * 1024)}, 413, "request_too_large"),
        ({"json": {**CHAT, "max_tokens": 10**6}}, 400, "context_length_exceeded"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors(
    make_gateway: MakeGateway,
    stub: StubBackend,
    stub_url: str,
    kwargs: dict[str, object],
    status: int,
    code: str | None,
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", **kwargs)  # type: ignore[arg-type]
    assert response.status == status
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert not stub.requests


async def test_unknown_path_without_a_model_is_404(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    response = await client.get("/version")
    assert response.status == 404
    assert "No route" in (await response.json())["error"]["message"]


async def test_models_lists_the_policy_models(make_gateway: MakeGateway, stub_url: str) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["m1"]


async def test_models_lists_only_what_the_key_may_use(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    text = policy_text([stub_url])
    second = text.split("models:\n", 1)[1].split("tenants:", 1)[0].replace("  m1:", "  m2:", 1)
    text = text.replace("tenants:\n", second + "tenants:\n", 1)
    text = text.replace('keys: ["env:ACME_KEY"]', 'keys: ["env:ACME_KEY"]\n    models: [m2]', 1)
    text = text.replace("  anonymous_tenant: anon\n", "", 1)
    client, _ = await make_gateway(text)

    async def listed(headers: dict[str, str]) -> tuple[int, Any]:
        response = await client.get("/v1/models", headers=headers)
        return response.status, await response.json()

    status, body = await listed({"Authorization": "Bearer sk-acme"})
    assert (status, [m["id"] for m in body["data"]]) == (200, ["m2"])
    for headers in ({"Authorization": "Bearer sk-nobody"}, {}):
        status, body = await listed(headers)
        assert status == 401
        assert "API key" in body["error"]["message"]


async def test_rate_limited_request_gets_429_with_exact_retry_headers(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    limits = "      - {unit: requests, rate: 1/min, burst: 2}"
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=limits))
    auth = {"Authorization": "Bearer sk-acme"}
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth)).status == 200
    response = await client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert response.status == 429
    error = (await response.json())["error"]
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    retry_ms = int(response.headers["retry-after-ms"])
    assert 59_000 <= retry_ms <= 60_000
    assert response.headers["Retry-After"] == "60"
    assert response.headers["x-ratelimit-limit-requests"] == "2"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


def _sample(metrics: object, name: str, **labels: str) -> float:
    registry = metrics.registry  # type: ignore[attr-defined]
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_clients_leaving_mid_stream_do_not_count_against_the_backend(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.hold_stream = True
    client, metrics = await make_gateway(policy_text([stub_url]))
    for _ in range(4):  # more than eject.failures (3)
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await response.content.readuntil(b"\n\n")
        response.close()
    stub.release.set()
    labels = {"tenant": "anon", "model": "m1", "outcome": "client_closed", "status": "200"}
    await until(lambda: metrics.registry.get_sample_value("kvgate_requests_total", labels) == 4)
    backend = client.app[GATEWAY].admitter.snapshot()["m1"]["backends"][0]  # type: ignore[index]
    assert backend["phase"] == "ready"
    assert backend["failures"] == 0
    assert backend["inflight"] == 0


async def test_a_stream_settles_to_its_real_usage_and_refunds_the_rest(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    limits = "      - {unit: tokens, rate: 1000/min}"
    client, metrics = await make_gateway(policy_text([stub_url], acme_limits=limits))
    auth = {"Authorization": "Bearer sk-acme"}
    body = {**CHAT, "stream": True, "max_tokens": 900}
    first = await client.post("/v1/chat/completions", json=body, headers=auth)
    # charged up front: the estimated prompt (~9) and all 900 reserved output tokens
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100
    await first.read()
    # settled to the real usage (7 prompt + 5 output): the unused 895 came back
    labels = {"tenant": "acme", "model": "m1", "kind": "output"}
    await until(lambda: metrics.registry.get_sample_value("kvgate_tokens_total", labels) == 5)
    second = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers=auth)
    assert second.status == 200
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 1000 - 12 - 20 <= remaining <= 1000 - 12


async def test_a_client_leaving_mid_stream_is_charged_for_what_it_received(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.hold_stream = True
    client, metrics = await make_gateway(policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await response.content.readuntil(b"\n\n")  # the first token's chunk
    response.close()
    labels = {"tenant": "anon", "model": "m1", "kind": "output"}
    await until(lambda: metrics.registry.get_sample_value("kvgate_tokens_total", labels) == 1)
    stub.release.set()


async def test_a_client_hanging_up_right_after_done_is_a_success(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    client, metrics = await make_gateway(policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    while not (await response.content.readuntil(b"\n\n")).startswith(b"data: [DONE]"):
        pass
    response.close()
    labels = {"tenant": "anon", "model": "m1", "outcome": "ok", "status": "200"}
    await until(lambda: metrics.registry.get_sample_value("kvgate_requests_total", labels) == 1)


async def test_access_log_names_tenants_and_outcomes_never_keys(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    limits = "      - {unit: requests, rate: 1/min, burst: 1}"
    client, _ = await make_gateway(policy_text([stub_url], acme_limits=limits))
    out = io.BytesIO()
    client.app[GATEWAY].access = AccessLog(stream=out)
    auth = {"Authorization": "Bearer sk-acme"}
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth)).status == 200
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth)).status == 429
    bad = {"Authorization": "Bearer sk-wrong"}
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=bad)).status == 401
    client.app[GATEWAY].access.flush()
    text = out.getvalue()
    assert b"sk-acme" not in text
    assert b"sk-wrong" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(r["tenant"], r["status"], r["outcome"]) for r in lines] == [
        ("acme", 200, "ok"),
        ("acme", 429, "rate_limited"),
        ("unknown", 401, "unauthorized"),
    ]
    assert lines[0]["backend"] == stub_url
    assert lines[0]["input_tokens"] > 0


async def test_cookies_a_backend_sets_go_to_its_client_and_never_to_another(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    stub.set_cookie = "session=acme-secret; Path=/"
    # by name: aiohttp's default cookie jar would ignore cookies from an IP address
    client, _ = await make_gateway(policy_text([stub_url.replace("127.0.0.1", "localhost")]))
    auth = {"Authorization": "Bearer sk-acme"}
    first = await client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert first.headers["Set-Cookie"] == "session=acme-secret; Path=/"
    client.session.cookie_jar.clear()  # another client: only the gateway could send it now
    await client.post("/v1/chat/completions", json=CHAT)  # the anonymous tenant
    assert "Cookie" not in stub.requests[-1].headers
