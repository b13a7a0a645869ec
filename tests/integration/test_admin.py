"""The admin listener and what the proxy tells clients and operators (issue 14, items 1 and 3):
the token, the reload trigger, the status label and the access log's real status, request ids,
tenants restricted to some models, limits named in the policy's words, the demand signals, and
promtool on a real page. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin import build_admin_app
from gateway.app import build_app
from gateway.errors import PolicyError
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from gateway.policy.watcher import read_policy
from gateway.state import GATEWAY
from tests.deploy.conftest import promtool
from tests.integration.conftest import MakeAdmin, MakeGateway, policy_text, until
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
ACME = {"Authorization": "Bearer sk-acme"}
Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def _server(text: str, lines: str) -> str:
    return text.replace("server:\n", f"server:\n{lines}", 1)


def _with_admin_token(text: str) -> str:
    return _server(text, "  admin: {host: 0.0.0.0, token: env:ADMIN_TOKEN}\n")


def _sample(page: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


# -- the token -----------------------------------------------------------------------------------


def test_an_admin_listener_beyond_loopback_needs_a_token() -> None:
    text = _server(policy_text(["http://127.0.0.1:9"]), "  admin: {host: 0.0.0.0}\n")
    with pytest.raises(PolicyError, match=r"at \$\.server\.admin\.token: .* needs a bearer token"):
        compile_policy(load_text(text), env={"ACME_KEY": "k"})
    loopback = _server(policy_text(["http://127.0.0.1:9"]), "  admin: {host: '::1'}\n")
    assert compile_policy(load_text(loopback), env={"ACME_KEY": "k"}).server.admin.token is None


def test_a_plaintext_admin_token_is_refused() -> None:
    text = _server(policy_text(["http://127.0.0.1:9"]), "  admin: {token: hunter2}\n")
    with pytest.raises(PolicyError, match="must be `env:VARIABLE`"):
        compile_policy(load_text(text), env={"ACME_KEY": "k"})


async def test_the_admin_listener_asks_for_its_token(
    make_gateway: MakeGateway, admin: MakeAdmin, stub_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "s3cret")
    client, _ = await make_gateway(_with_admin_token(policy_text([stub_url])))
    ops = await admin(client)
    for path in ("/metrics", "/admin/state", "/status"):
        refused = await ops.get(path)
        assert refused.status == 401
        challenges = refused.headers.getall("WWW-Authenticate")
        assert challenges == ['Basic realm="kvgate admin"', 'Bearer realm="kvgate admin"']
        assert (await ops.get(path, headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await ops.get(path, headers={"Authorization": "Bearer s3cret"})).status == 200
    # a browser sends it as the password of HTTP Basic, after asking once
    basic = base64.b64encode(b"operator:s3cret").decode()
    assert (await ops.get("/status", headers={"Authorization": f"Basic {basic}"})).status == 200
    assert (await ops.get("/status", headers={"Authorization": "Basic !!"})).status == 401
    # the probes answer anyone, as on the proxy port
    assert (await ops.get("/healthz")).status == 200
    assert (await ops.get("/readyz")).status == 200


async def test_nothing_internal_answers_on_the_proxy_port(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    client, _ = await make_gateway(
        policy_text([stub_url]).replace("  anonymous_tenant: anon\n", "")
    )
    for path in ("/metrics", "/admin/state", "/admin/reload", "/status"):
        response = await client.get(path)
        assert response.status == 404, path
        assert "admin listener" in (await response.json())["error"]["message"]
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_the_reload_trigger_reloads_the_file(
    tmp_path: Path,
    stub_url: str,
    aiohttp_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACME_KEY", "sk-acme")
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text([stub_url]))
    policy, digest = read_policy(path)
    client = await aiohttp_client(build_app(policy, watch=(path, digest)))
    ops = await aiohttp_client(build_admin_app(client.app))
    edited = policy_text([stub_url]).replace("max_wait: 5s", "max_wait: 4s")
    path.write_text(edited)
    answer = await ops.post("/admin/reload")
    live = client.app[GATEWAY].live.policy
    assert answer.status == 200
    assert await answer.json() == {"result": "ok", "policy": live.fingerprint}
    assert live.fingerprint != policy.fingerprint
    assert live.max_wait_s == 4.0
    again = await ops.post("/admin/reload")
    assert (again.status, (await again.json())["result"]) == (200, "unchanged")
    path.write_text(edited.replace("max_wait: 4s", "max_wait: soon"))
    broken = await ops.post("/admin/reload")
    body = await broken.json()
    assert broken.status == 422
    assert (body["result"], body["policy"]) == ("error", live.fingerprint)
    assert "max_wait" in body["error"]
    assert client.app[GATEWAY].live.policy is live


async def test_the_reload_trigger_without_a_file_says_so(
    make_gateway: MakeGateway, admin: MakeAdmin, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    answer = await (await admin(client)).post("/admin/reload")
    assert answer.status == 409


# -- what the client got, in the metrics and the access log ------------------------------------


async def _gateway_with_log(
    aiohttp_client: ClientFactory, text: str, wait_ready: bool = True
) -> tuple[Client, Metrics, io.BytesIO]:
    metrics = Metrics()
    app = build_app(compile_policy(load_text(text), env={"ACME_KEY": "sk-acme"}), metrics=metrics)
    stream = io.BytesIO()
    app[GATEWAY].access = AccessLog(stream)
    client = await aiohttp_client(app)
    if wait_ready:
        await until(lambda: app[GATEWAY].admitter.any_ready())
    return client, metrics, stream


def _log_lines(client: Client, stream: io.BytesIO) -> list[dict[str, object]]:
    access = client.app[GATEWAY].access
    assert access is not None
    access.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_shed_request_is_logged_and_counted_with_its_503(
    aiohttp_client: ClientFactory,
) -> None:
    with socket.socket() as sock:  # a backend that never comes up
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client, metrics, stream = await _gateway_with_log(aiohttp_client, policy_text([url]), False)
    shed = await client.post("/v1/chat/completions", json=CHAT)
    assert shed.status == 503
    [line] = _log_lines(client, stream)
    assert (line["status"], line["outcome"]) == (503, "shed_loading")
    labels = {"tenant": "anon", "model": "m1", "outcome": "shed_loading", "status": "503"}
    assert metrics.registry.get_sample_value("kvgate_requests_total", labels) == 1


async def _started(request: Awaitable[object], stub: StubBackend) -> asyncio.Future[object]:
    future = asyncio.ensure_future(request)
    await until(lambda: stub.requests)
    return future


async def _queued(request: Awaitable[object], client: Client) -> asyncio.Future[object]:
    future = asyncio.ensure_future(request)
    gw = client.app[GATEWAY]
    await until(lambda: gw.admitter.waiting == 1)
    return future


async def test_a_backends_404_is_not_ok(aiohttp_client: ClientFactory) -> None:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"detail": "Not Found"}, status=404)

    backend = web.Application()
    backend.router.add_get("/health", health)
    backend.router.add_route("*", "/{tail:.*}", missing)
    server = await TestServer(backend, host="127.0.0.1").__aenter__()
    try:
        url = f"http://127.0.0.1:{server.port}"
        client, metrics, stream = await _gateway_with_log(aiohttp_client, policy_text([url]))
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status == 404
        labels = {"tenant": "anon", "model": "m1", "outcome": "upstream_client_error"}
        assert (
            metrics.registry.get_sample_value("kvgate_requests_total", {**labels, "status": "404"})
            == 1
        )
        [line] = _log_lines(client, stream)
        assert (line["status"], line["outcome"]) == (404, "upstream_client_error")
    finally:
        await server.close()


# -- request ids ---------------------------------------------------------------------------------


def _upstream_id(stub: StubBackend) -> str:
    headers = {name.lower(): value for name, value in stub.requests[-1].headers.items()}
    return headers["x-request-id"]


async def test_a_request_id_is_kept_passed_upstream_returned_and_logged(
    aiohttp_client: ClientFactory, stub: StubBackend, stub_url: str
) -> None:
    client, _, stream = await _gateway_with_log(aiohttp_client, policy_text([stub_url]))
    sent = "req_0123-abc.DEF:9"
    response = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": sent})
    assert response.status == 200
    assert response.headers["x-request-id"] == sent
    assert _upstream_id(stub) == sent
    streamed = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-request-id": "s-1"}
    )
    await streamed.read()
    assert streamed.headers["x-request-id"] == "s-1"
    assert [line["request_id"] for line in _log_lines(client, stream)] == [sent, "s-1"]


@pytest.mark.parametrize("given", ["", "x" * 129, "a b", "evil\u00e9", "line;break"])
async def test_a_bad_request_id_is_replaced(
    aiohttp_client: ClientFactory, stub: StubBackend, stub_url: str, given: str
) -> None:
    client, _, _ = await _gateway_with_log(aiohttp_client, policy_text([stub_url]))
    headers = {"x-request-id": given.encode("utf-8").decode("latin-1")}
    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    made = response.headers["x-request-id"]
    assert made != given
    assert len(made) == 32
    assert _upstream_id(stub) == made


async def test_a_refused_request_gets_a_request_id_too(
    aiohttp_client: ClientFactory, stub_url: str
) -> None:
    client, _, stream = await _gateway_with_log(aiohttp_client, policy_text([stub_url]))
    response = await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": "nope"})
    assert response.status == 401
    assert response.headers["x-request-id"]
    [line] = _log_lines(client, stream)
    assert line["request_id"] == response.headers["x-request-id"]


# -- tenants and their models; limits in the policy's words --------------------------------------

TWO_MODELS = """
version: 1
server: {{admin: {{port: 0}}}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    backends: [{{url: {url}, kv_capacity: 4GiB, signals: none, warmup: 0s, probe_interval: 50ms}}]
  m2:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    backends: [{{url: {url}, kv_capacity: 4GiB, signals: none, warmup: 0s, probe_interval: 50ms}}]
tenants:
  acme:
    keys: ["env:ACME_KEY"]
    models: [m2]
    limits: [{{unit: tokens, rate: 200k/min}}, {{unit: requests, rate: 1/h, burst: 1}}]
"""


def test_a_tenants_models_must_exist() -> None:
    text = TWO_MODELS.format(url="http://127.0.0.1:9").replace("models: [m2]", "models: [m3]")
    with pytest.raises(PolicyError, match=r"at \$\.tenants\.acme\.models\[0\]: no model named"):
        compile_policy(load_text(text), env={"ACME_KEY": "k"})


async def test_a_tenant_is_refused_a_model_it_may_not_use(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, metrics = await make_gateway(TWO_MODELS.format(url=stub_url))
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=ACME)
    assert refused.status == 403
    error = (await refused.json())["error"]
    assert error["code"] == "model_not_allowed"
    assert error["message"] == "Tenant acme may not use the model `m1`. Its models: m2."
    assert refused.headers["x-should-retry"] == "false"
    anthropic = {"model": "m1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    shaped = await client.post("/v1/messages", json=anthropic, headers=ACME)
    assert shaped.status == 403
    assert (await shaped.json())["error"]["type"] == "permission_error"
    assert not stub.requests
    allowed = await client.post("/v1/chat/completions", json={**CHAT, "model": "m2"}, headers=ACME)
    assert allowed.status == 200
    labels = {"tenant": "acme", "model": "m1", "outcome": "forbidden", "status": "403"}
    assert metrics.registry.get_sample_value("kvgate_requests_total", labels) == 2


async def test_a_429_names_the_limit_in_the_policys_words(
    make_gateway: MakeGateway, stub_url: str
) -> None:
    client, _ = await make_gateway(TWO_MODELS.format(url=stub_url))
    chat = {**CHAT, "model": "m2"}
    assert (await client.post("/v1/chat/completions", json=chat, headers=ACME)).status == 200
    refused = await client.post("/v1/chat/completions", json=chat, headers=ACME)
    assert refused.status == 429
    message = (await refused.json())["error"]["message"]
    assert message.startswith("Rate limit reached: tenant acme's requests limit of 1/h (burst 1).")
    assert "t:acme" not in message


# -- the demand signals and promtool -------------------------------------------------------------


async def test_the_metrics_page_has_the_demand_signals_and_passes_promtool(
    make_gateway: MakeGateway, admin: MakeAdmin, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    ops = await admin(client)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    stub.hold_first_byte = True
    held = await _started(client.post("/v1/chat/completions", json=CHAT), stub)
    page = await (await ops.get("/metrics")).text()
    usable = _sample(page, "kvgate_backend_kv_usable_bytes", model="m1", backend=stub_url)
    assert usable is not None
    assert usable > 0
    assert _sample(page, "kvgate_model_kv_usable_bytes", model="m1") == usable
    wanted = _sample(page, "kvgate_model_kv_wanted_bytes", model="m1")
    assert wanted is not None
    assert wanted > 0  # the held request's reservation
    assert _sample(page, "kvgate_queue_kv_bytes", model="m1") == 0
    drain = _sample(page, "kvgate_queue_drain_bytes_per_second", model="m1")
    assert drain is not None
    assert drain > 0  # the first request finished
    assert _sample(page, "kvgate_queue_predicted_wait_seconds", model="m1") == 0
    assert _sample(page, "kvgate_kv_byte_seconds_total", tenant="anon") > 0  # type: ignore[operator]
    assert _sample(page, "kvgate_build_info") == 1
    assert _sample(page, "kvgate_policy_last_reload_success_timestamp_seconds") > 1.6e9  # type: ignore[operator]
    assert _sample(page, "kvgate_backend_slots_usable") is None  # no llama.cpp here
    stub.release.set()
    assert (await held).status == 200
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool(), "check", "metrics"],
        input=page.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
