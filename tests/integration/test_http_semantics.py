"""HTTP semantics on pass-through paths (a policy with a fallback model proxies paths that carry
no JSON model): HEAD, redirects, encoded targets, repeated headers, bodiless statuses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.integration.conftest import MakeGateway, policy_text
from tests.integration.traffic import health

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., Awaitable[TestServer]]


def _with_fallback(text: str) -> str:
    """The policy with `fallback_model: m1`: paths without a JSON model are proxied to m1
    (the echo backend's paths opened by `allow_paths`)."""
    return text.replace(
        "allow_paths: [/v1/custom]",
        "fallback_model: m1\n  allow_paths: ['/files/*', '/v1/files/*', '/redirect',"
        " '/no-content', '/not-modified']",
    )


@dataclass
class _Echo:
    seen: list[tuple[str, str, dict[str, list[str]], bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        self.seen.append((request.method, request.raw_path, headers, body))
        tail = request.match_info["tail"]
        if tail == "no-content":
            return web.Response(status=204)
        if tail == "not-modified":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        if tail == "redirect":
            return web.Response(status=307, headers={"Location": f"{request.url.origin()}/moved"})
        response = web.Response(
            body=b"x" * 1234, content_type="application/octet-stream", headers={"ETag": '"v1"'}
        )
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        response.headers.add("X-Custom", "one")
        response.headers.add("X-Custom", "two")
        return response


@pytest.fixture
async def echo_url(aiohttp_server: ServerFactory) -> tuple[_Echo, str]:
    echo = _Echo()
    server = await aiohttp_server(echo.app())
    return echo, f"http://127.0.0.1:{server.port}"


async def test_head_answers_with_the_length_get_would_have(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    _, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    get = await client.get("/files/a")
    assert get.headers["Content-Length"] == "1234"
    head = await client.head("/files/a")
    assert head.status == 200
    assert head.headers["Content-Length"] == "1234"


async def test_a_redirect_points_at_the_gateway_not_the_backend(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    _, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    response = await client.get("/redirect", allow_redirects=False)
    assert response.status == 307
    location = response.headers["Location"]
    assert not location.startswith(url)  # the backend's own address, unreachable or a bypass
    assert location.endswith("/moved")


# Checks: encoded characters in the path and query reach the backend byte for byte.
async def test_encoded_paths_and_query_strings_are_forwarded_verbatim(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    echo, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    target = "/v1/files/a%2Fb%20c%3Fd%25+%E2%9C%93?x=1%262&y=a+b&z=%E2%9C%93&w=%2B&e="
    response = await client.get(target)
    assert response.status == 200
    assert echo.seen[-1][1] == target


# Checks: repeated request and response headers (two Set-Cookie, two X-Custom) all cross.
async def test_repeated_headers_cross_the_proxy_in_both_directions(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    echo, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    headers = [("X-Custom", "c1"), ("X-Custom", "c2")]
    response = await client.get("/files/a", headers=headers)
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers.getall("X-Custom") == ["one", "two"]
    assert echo.seen[-1][2]["x-custom"] == ["c1", "c2"]


# Checks: DELETE and a body-less GET pass through; 204 and 304 arrive without a body.
async def test_delete_204_and_304_pass_through(
    make_gateway: MakeGateway, echo_url: tuple[_Echo, str]
) -> None:
    echo, url = echo_url
    client, _ = await make_gateway(_with_fallback(policy_text([url])))
    deleted = await client.delete("/v1/files/f1")
    assert deleted.status == 200
    assert echo.seen[-1][0] == "DELETE"
    empty = await client.get("/no-content")
    assert empty.status == 204
    assert await empty.read() == b""
    cached = await client.get("/not-modified", headers={"If-None-Match": '"v1"'})
    assert cached.status == 304
    assert cached.headers["ETag"] == '"v1"'
    assert await cached.read() == b""
