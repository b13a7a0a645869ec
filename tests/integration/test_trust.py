"""Nothing from a backend or the policy file is trusted to be shown as is: credentials in a
backend URL are refused, and a backend's failure reaches clients as a summary without its
address."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import PolicyError
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.rawbackend import MakeRawBackend, RawRequest

pytestmark = pytest.mark.integration

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


# Checks: `user:password@` in a backend URL is refused at its path, pointing to api_key.
def test_credentials_in_a_backend_url_are_refused() -> None:
    text = policy_text(["http://admin:hunter2@127.0.0.1:9"])
    with pytest.raises(PolicyError) as caught:
        compile_policy(load_text(text), env={"ACME_KEY": "k"})
    message = str(caught.value)
    assert "$.models.m1.backends[0].url" in message
    assert "api_key: env:" in message
    assert "hunter2" not in message


# Checks: a 502 for an unreachable backend names the model and the kind of failure, never the
# backend's address.
async def test_a_502_does_not_show_the_backend_address(
    make_gateway: MakeGateway, raw_backend: MakeRawBackend
) -> None:
    async def garbage(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")

    backend = await raw_backend(garbage)
    client, _ = await make_gateway(policy_text([backend.url]))
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 502
    message = (await response.json())["error"]["message"]
    assert message.startswith("The backend of `m1` answered badly")
    assert "127.0.0.1" not in message
    assert str(backend.url.rsplit(":", 1)[1]) not in message
