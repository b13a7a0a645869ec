"""The one mapping from refusals and failures to HTTP: OpenAI's error shape, statuses and the
retry headers the official SDKs obey.

openai-python retries 408/409/429/5xx, waits ``retry-after-ms`` else ``Retry-After`` when it is
between 0 and 120 s, and ``x-should-retry`` overrides its decision: we send ``false`` where waiting
cannot help, and an honest wait everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec
from aiohttp import web

from gateway.core.types import Outcome

_STATUS: dict[Outcome, tuple[int, str, str]] = {
    Outcome.BAD_REQUEST: (400, "invalid_request_error", "invalid_request"),
    Outcome.UNAUTHORIZED: (401, "invalid_request_error", "invalid_api_key"),
    Outcome.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    Outcome.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    Outcome.RATE_LIMITED: (429, "requests", "rate_limit_exceeded"),
    Outcome.SHED_QUEUE_FULL: (503, "overloaded", "queue_full"),
    Outcome.SHED_DEADLINE: (503, "overloaded", "deadline"),
    Outcome.SHED_OVERLOAD: (503, "overloaded", "queue_delay"),
    Outcome.SHED_LOADING: (503, "overloaded", "backend_loading"),
    Outcome.SHED_FRAGMENTATION: (503, "overloaded", "fragmentation"),
    Outcome.STORE_ERROR: (503, "overloaded", "store_unavailable"),
    Outcome.UPSTREAM_ERROR: (502, "upstream_error", "bad_gateway"),
    Outcome.UPSTREAM_TIMEOUT: (504, "timeout", "upstream_timeout"),
}

_encode = msgspec.json.Encoder().encode


def error(
    outcome: Outcome,
    message: str,
    *,
    status: int | None = None,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after_s: float | None = None,
    should_retry: bool | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's shape ``{"error": {message, type, param, code}}``."""
    default_status, default_type, default_code = _STATUS[outcome]
    body = {
        "error": {
            "message": message,
            "type": type_ or default_type,
            "param": param,
            "code": code or default_code,
        }
    }
    out = dict(headers) if headers else {}
    out["x-kvgate-outcome"] = outcome.value
    if retry_after_s is not None:
        out.update(retry_headers(retry_after_s))
    if should_retry is not None:
        out["x-should-retry"] = "true" if should_retry else "false"
    return web.Response(
        status=status or default_status,
        body=_encode(body),
        content_type="application/json",
        headers=out,
    )


def retry_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up: never early) and exact ``retry-after-ms``."""
    seconds = max(seconds, 0.0)
    return {
        "Retry-After": str(math.ceil(seconds)),
        "retry-after-ms": str(math.ceil(seconds * 1000)),
    }


def reset_text(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
