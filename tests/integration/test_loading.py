"""Model loading and restarts on real time scales, against a backend that behaves as real
servers do: its port refuses connections while its process starts (vLLM), then it answers 503
"Loading model" (llama.cpp, TGI), then it serves; and a backend killed mid-stream that comes
back. Requests that can wait are held through all of it and served, none shed."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway.state import GATEWAY
from tests.integration.conftest import MakeGateway, until
from tests.integration.stub import StubBackend

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_LOADING = {"error": {"message": "Loading model", "type": "unavailable_error"}}


def _policy(url: str, *, max_wait: str = "120s") -> str:
    # default admission settings but for max_wait; one request at a time, so the order in which
    # the backend sees them is the order admission released them
    return f"""
version: 1
server: {{anonymous_tenant: anon}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    default_max_tokens: 64
    backends:
      - {{url: "{url}", kv_capacity: 4GiB, signals: none, probe_interval: 200ms,
          max_concurrency: 1}}
tenants:
  anon:
    limits: [{{unit: requests, rate: 1000/s}}]
admission:
  queue: {{max_wait: {max_wait}}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class ModelServer:
    """A model server at a fixed port that can be absent (nothing listening), loading (503 on
    every path) or serving; streams are sent a token every ``token_gap_s``."""

    port: int
    loading: bool = True
    token_gap_s: float = 0.05
    tokens: int = 4
    seen: list[str] = field(default_factory=list)  # request ids, in arrival order
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def kill(self) -> None:
        """The process dies: its port closes and open connections are cut."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        if self.loading:
            return web.json_response(_LOADING, status=503)
        return web.json_response({"status": "ok"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.loading:
            return web.json_response(_LOADING, status=503)
        body = await request.json()
        self.seen.append(request.headers.get("x-test-id", "?"))
        if not body.get("stream"):
            await asyncio.sleep(self.token_gap_s * self.tokens)
            return web.json_response(
                {
                    "choices": [{"message": {"content": "ok"}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": self.tokens},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(self.tokens):
            await asyncio.sleep(self.token_gap_s)
            chunk = {"choices": [{"delta": {"content": "x"}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


def _chat(stream: bool = False) -> dict[str, object]:
    return {
        "model": "m1",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "stream": stream,
    }


@pytest.mark.timeout(150)
async def test_requests_sent_while_the_backend_loads_are_all_served_in_priority_order(
    make_gateway: MakeGateway,
) -> None:
    backend = ModelServer(_free_port())
    client, _ = await make_gateway(_policy(backend.url), wait_ready=False)
    sends = []
    try:
        # the 60 s load: 30 s with nothing listening, as vLLM while its engine starts,
        for i in range(6):
            band = "sheddable" if i % 2 else "standard"
            headers = {"x-kvgate-priority": band, "x-test-id": f"{band}-{i}"}
            sends.append(
                asyncio.ensure_future(
                    client.post("/v1/chat/completions", json=_chat(), headers=headers)
                )
            )
            await asyncio.sleep(1.0)
        await asyncio.sleep(24.0)
        await backend.start()  # then 30 s of 503 "Loading model", as llama.cpp
        await asyncio.sleep(30.0)
        assert not any(s.done() for s in sends)  # held, none shed
        backend.loading = False
        responses = await asyncio.wait_for(asyncio.gather(*sends), 30)
        assert [r.status for r in responses] == [200] * 6
        # standard before sheddable, each band in arrival order
        assert backend.seen == [
            "standard-0",
            "standard-2",
            "standard-4",
            "sheddable-1",
            "sheddable-3",
            "sheddable-5",
        ]
    finally:
        for s in sends:
            s.cancel()
        await backend.kill()


async def test_a_request_that_cannot_be_served_in_time_is_told_when_at_once(
    make_gateway: MakeGateway,
) -> None:
    backend = ModelServer(_free_port())
    text = _policy(backend.url, max_wait="5s").replace(
        "max_concurrency: 1}", "max_concurrency: 1, expected_load: 20s}"
    )
    client, _ = await make_gateway(text, wait_ready=False)
    response = await client.post("/v1/chat/completions", json=_chat())
    assert response.status == 503
    assert response.headers["x-kvgate-outcome"] == "shed_loading"
    assert 19 <= int(response.headers["Retry-After"]) <= 21  # the predicted end of loading


async def test_a_backend_killed_mid_stream_loses_only_its_streams(
    make_gateway: MakeGateway,
) -> None:
    backend = ModelServer(_free_port(), loading=False, token_gap_s=0.5, tokens=20)
    await backend.start()
    client, _ = await make_gateway(_policy(backend.url))
    gw = client.app[GATEWAY]
    try:
        streaming = await client.post("/v1/chat/completions", json=_chat(stream=True))
        assert streaming.status == 200
        await streaming.content.readline()  # the first token arrived
        queued = asyncio.ensure_future(client.post("/v1/chat/completions", json=_chat()))
        await asyncio.sleep(0.5)
        await backend.kill()  # the process dies mid-stream
        text = (await streaming.read()).decode()
        assert '"type": "upstream_error"' in text or '"type":"upstream_error"' in text
        await asyncio.sleep(2.0)  # restarts: 2 s of 503, then it serves again
        backend.loading, backend.token_gap_s, backend.tokens = True, 0.05, 4
        await backend.start()
        await asyncio.sleep(2.0)
        backend.loading = False
        answer = await asyncio.wait_for(queued, 30)
        assert answer.status == 200, await answer.text()
    finally:
        await backend.kill()

    def reserved() -> float:
        state = gw.admitter.snapshot()["m1"]
        return sum(float(b["reserved_bytes"]) for b in state["backends"])  # type: ignore[index]

    await until(lambda: reserved() == 0)


async def test_a_streams_first_token_measures_a_warming_backend_before_any_request_ends(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    # The warm-up floor holds one request; the ramp grows only once the backend is seen
    # answering. Heard at the first token, not when the request ends, the second request is
    # admitted while the first still streams (heard at the end, it would wait for ever here).
    stub.health_status = 503
    stub.hold_stream = True
    stub.metrics = (
        'vllm:num_requests_running{model_name="m1"} 1\n'
        'vllm:num_requests_waiting{model_name="m1"} 0\n'
    )
    text = f"""
version: 1
server: {{anonymous_tenant: anon}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    default_max_tokens: 64
    backends:
      - {{url: "{stub_url}", kv_capacity: 1GiB, signals: vllm, memory: contiguous,
          probe_interval: 50ms, warmup: 60s}}
tenants:
  anon:
    limits: [{{unit: requests, rate: 1000/s}}]
admission:
  headroom: 0%
  warmup: {{floor: 10%}}
"""
    client, _ = await make_gateway(text, wait_ready=False)
    # 1 GiB holds 8192 tokens of this model: the 10 % floor one request of 700, two after
    # one doubling
    body = {**_chat(stream=True), "max_tokens": 690}
    await asyncio.sleep(0.3)  # probes see it loading: it will warm, not start ready
    stub.health_status = 200
    while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    first = await client.post("/v1/chat/completions", json=body)
    try:
        assert first.status == 200
        assert (await first.content.readline()).startswith(b"data: ")
        second = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        await asyncio.wait_for(_arrivals(stub, 2), 10)
        stub.release.set()
        assert (await second).status == 200
    finally:
        stub.release.set()
        first.release()


async def _arrivals(stub: StubBackend, n: int) -> None:
    while len(stub.requests) < n:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
