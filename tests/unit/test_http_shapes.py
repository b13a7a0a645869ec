"""Header hygiene and the OpenAI error shape, as pure functions."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.types import Outcome
from gateway.proxy import responses
from gateway.proxy.headers import downstream_headers, upstream_headers


def test_upstream_headers_drop_credentials_and_hop_by_hop() -> None:
    incoming = CIMultiDictProxy(
        CIMultiDict(
            {
                "Authorization": "Bearer client",
                "api-key": "client",
                "Connection": "close, X-Hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Accept-Encoding": "gzip",
                "Content-Type": "application/json",
                "X-Forwarded-For": "10.0.0.1",
            }
        )
    )
    out = upstream_headers(incoming, peer="127.0.0.1", scheme="https", backend_auth="Bearer b")
    assert dict(out) == {
        "Content-Type": "application/json",
        "X-Forwarded-For": "10.0.0.1, 127.0.0.1",
        "X-Forwarded-Proto": "https",
        "Authorization": "Bearer b",
    }


def test_downstream_headers_keep_end_to_end_ones() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "text/event-stream"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "only for this connection"),
            ("X-Req", "1"),
        ]
    )
    out = downstream_headers(CIMultiDictProxy(upstream))
    assert dict(out) == {"Content-Type": "text/event-stream", "X-Req": "1"}


def test_the_gateways_own_headers_replace_the_backends() -> None:
    upstream = CIMultiDict([("X-Request-Id", "backend's"), ("X-Req", "1")])
    out = downstream_headers(CIMultiDictProxy(upstream), {"x-request-id": "gateway's"})
    assert out.getall("x-request-id") == ["gateway's"]
    assert out["X-Req"] == "1"


def test_error_has_openai_shape_and_retry_headers() -> None:
    response = responses.error(Outcome.SHED_QUEUE_FULL, "busy", retry_after_s=1.2)
    assert response.status == 503
    assert response.body is not None
    assert json.loads(bytes(response.body)) == {  # type: ignore[arg-type]
        "error": {"message": "busy", "type": "overloaded", "param": None, "code": "queue_full"}
    }
    assert response.headers["Retry-After"] == "2"
    assert response.headers["retry-after-ms"] == "1200"
    assert response.headers["x-kvgate-outcome"] == "shed_queue_full"


def test_never_retry_is_said_explicitly() -> None:
    response = responses.error(Outcome.RATE_LIMITED, "too big", should_retry=False)
    assert response.headers["x-should-retry"] == "false"
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.12, "120ms"), (1.0, "1s"), (59.2, "1m0s"), (360, "6m0s"), (3661, "1h1m1s")],
)
def test_reset_text_matches_openai_format(seconds: float, text: str) -> None:
    assert responses.reset_text(seconds) == text
