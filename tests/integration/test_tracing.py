"""OpenTelemetry traces (the ``otel`` extra): a span per request with the GenAI conventions'
attributes, the client's trace continued and passed to the backend; off by default. Spans are
read back from the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from gateway.state import GATEWAY
from gateway.tracing import RequestTracer
from tests.integration.conftest import policy_text, until
from tests.integration.stub import StubBackend

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def _traced(
    aiohttp_client: Callable[..., Awaitable[Client]], stub_url: str
) -> tuple[Client, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    policy = compile_policy(load_text(policy_text([stub_url])), env={"ACME_KEY": "sk-acme"})
    client = await aiohttp_client(build_app(policy, tracer=RequestTracer(provider)))
    await until(lambda: client.app[GATEWAY].admitter.any_ready())
    return client, exporter


async def test_a_request_is_one_span_with_the_genai_attributes(
    aiohttp_client: Callable[..., Awaitable[Client]], stub: StubBackend, stub_url: str
) -> None:
    client, exporter = await _traced(aiohttp_client, stub_url)
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"traceparent": PARENT}
    )
    assert response.status == 200
    await response.read()
    await until(lambda: exporter.get_finished_spans())
    [span] = exporter.get_finished_spans()
    assert span.name == "chat m1"
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "m1"
    assert attributes["gen_ai.usage.output_tokens"] == stub.completion_tokens
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.server.time_to_first_token"] >= 0
    assert attributes["http.response.status_code"] == 200
    assert attributes["kvgate.outcome"] == "ok"
    # the client's trace goes on, and the backend hears of the gateway's span
    assert f"{span.context.trace_id:032x}" == PARENT.split("-")[1]
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == PARENT.split("-")[2]
    upstream = {k.lower(): v for k, v in stub.requests[-1].headers.items()}
    assert upstream["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"


async def test_a_refused_request_has_its_span_and_status(
    aiohttp_client: Callable[..., Awaitable[Client]], stub_url: str
) -> None:
    client, exporter = await _traced(aiohttp_client, stub_url)
    response = await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": "no"})
    assert response.status == 401
    [span] = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == 401
    assert attributes["kvgate.outcome"] == "unauthorized"
    assert "gen_ai.usage.input_tokens" not in attributes


def test_tracing_is_off_by_default(stub_url: str) -> None:
    policy = compile_policy(load_text(policy_text([stub_url])), env={"ACME_KEY": "k"})
    assert build_app(policy)[GATEWAY].tracer is None
