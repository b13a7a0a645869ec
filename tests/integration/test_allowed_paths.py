"""Only API paths are proxied: a backend's administration paths never answer through the
gateway, even when the policy opens every path, and unlisted paths are 404 unless opened."""

from __future__ import annotations

import pytest

from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

ADMIN = [
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/collective_rpc"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/update_weights_from_disk"),
    ("POST", "/flush_cache"),
    ("POST", "/release_memory_occupation"),
    ("POST", "/slots/0"),
    ("POST", "/props"),
    ("POST", "/api/pull"),
    ("DELETE", "/api/delete"),
    ("POST", "/admin/restart"),
    ("POST", "/admin/restart/"),
    ("GET", "/sim/stats"),
    ("POST", "/admin/completions"),
]


# Checks: every admin path is a 404 that never reaches the backend, even with `allow_paths: ['/*']`.
@pytest.mark.parametrize(("method", "path"), ADMIN)
async def test_backend_admin_paths_never_reach_the_backend(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str, method: str, path: str
) -> None:
    text = policy_text([stub_url]).replace("allow_paths: [/v1/custom]", "allow_paths: ['/*']")
    client, metrics = await make_gateway(text)
    response = await client.request(method, path, json={"model": "m1"})
    assert response.status == 404
    assert not stub.requests
    message = (await response.json())["error"]["message"]
    if path.startswith("/admin"):
        # the gateway's own admin paths answer that they live on the admin listener
        assert "admin listener" in message
        return
    assert "not a path this gateway proxies" in message
    labels = {"tenant": "unknown", "model": "unknown", "outcome": "not_found", "status": "404"}
    assert metrics.registry.get_sample_value("kvgate_requests_total", labels) == 1.0


# Checks: an unlisted path is 404 until the policy opens it; API paths pass.
async def test_unlisted_paths_need_allow_paths(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str
) -> None:
    client, _ = await make_gateway(policy_text([stub_url]))
    assert (await client.post("/v2/whatever", json={"model": "m1"})).status == 404
    assert not stub.requests
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    opened = policy_text([stub_url]).replace("allow_paths: [/v1/custom]", "allow_paths: ['/v2/*']")
    client, _ = await make_gateway(opened)
    assert (await client.post("/v2/whatever", json={"model": "m1"})).status == 200
