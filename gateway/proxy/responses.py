"""The one mapping from refusals and failures to HTTP: OpenAI's error shape, statuses and the
retry headers the official SDKs obey, and Anthropic's for the requests that speak its API.

openai-python retries 408/409/429/5xx, waits ``retry-after-ms`` else ``Retry-After`` when it is
between 0 and 120 s, and ``x-should-retry`` overrides its decision: we send ``false`` where waiting
cannot help, and an honest wait everywhere else. anthropic-python reads the same three headers
(a wait up to 60 s) and retries 408/409/429/5xx; it expects ``529 overloaded_error`` where the
service is overloaded, so a shed request answers 529 on the Anthropic path.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping

import msgspec
from aiohttp import web

from gateway.core.types import Outcome

_STATUS: dict[Outcome, tuple[int, str, str]] = {
    Outcome.BAD_REQUEST: (400, "invalid_request_error", "invalid_request"),
    Outcome.UNAUTHORIZED: (401, "invalid_request_error", "invalid_api_key"),
    Outcome.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    Outcome.FORBIDDEN: (403, "invalid_request_error", "model_not_allowed"),
    Outcome.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    Outcome.REQUEST_TIMEOUT: (408, "invalid_request_error", "request_timeout"),
    Outcome.INTERNAL_ERROR: (500, "server_error", "internal_error"),
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

_ANTHROPIC: dict[Outcome, tuple[int | None, str]] = {  # None: the OpenAI status
    Outcome.BAD_REQUEST: (None, "invalid_request_error"),
    Outcome.UNAUTHORIZED: (None, "authentication_error"),
    Outcome.NOT_FOUND: (None, "not_found_error"),
    Outcome.FORBIDDEN: (None, "permission_error"),
    Outcome.TOO_LARGE: (None, "request_too_large"),
    Outcome.REQUEST_TIMEOUT: (None, "invalid_request_error"),
    Outcome.INTERNAL_ERROR: (None, "api_error"),
    Outcome.RATE_LIMITED: (None, "rate_limit_error"),
    Outcome.SHED_QUEUE_FULL: (529, "overloaded_error"),
    Outcome.SHED_DEADLINE: (529, "overloaded_error"),
    Outcome.SHED_OVERLOAD: (529, "overloaded_error"),
    Outcome.SHED_LOADING: (529, "overloaded_error"),
    Outcome.SHED_FRAGMENTATION: (529, "overloaded_error"),
    Outcome.STORE_ERROR: (529, "overloaded_error"),
    Outcome.UPSTREAM_ERROR: (None, "api_error"),
    Outcome.UPSTREAM_TIMEOUT: (None, "timeout_error"),
}

_encode = msgspec.json.Encoder().encode


class ErrorShape(enum.Enum):
    """The error body and statuses an API's clients expect."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class ErrorResponse(web.Response):
    """An error the gateway made (not a backend's), with what it says, so ``shaped`` can put it
    in another API's shape."""

    def __init__(
        self, outcome: Outcome, message: str, *, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        super().__init__(status=status, body=body, content_type="application/json", headers=headers)
        self.outcome = outcome
        self.message = message


BAD_KEY = "Invalid or missing API key: send `Authorization: Bearer <key>` or `api-key`."


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
    return ErrorResponse(
        outcome,
        message,
        status=status or default_status,
        body=_encode(body),
        headers=out,
    )


_OPENAI_SHAPE = ErrorShape.OPENAI  # bound once: see ``exchange._OK``


def shaped(response: web.StreamResponse, shape: ErrorShape) -> web.StreamResponse:
    """``response`` in the error shape of the request's API: Anthropic's is
    ``{"type": "error", "error": {"type", "message"}}`` with 529 for overload. Answers that are
    not the gateway's own errors pass unchanged."""
    if shape is _OPENAI_SHAPE or not isinstance(response, ErrorResponse):
        return response
    status, type_ = _ANTHROPIC[response.outcome]
    if status is not None:
        response.set_status(status)
    error = {"type": type_, "message": response.message}
    response.body = _encode({"type": "error", "error": error})
    return response


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
        ms = math.ceil(seconds * 1000)
        return f"{ms if ms > 0 else 0}ms"  # not max(): see ``limits.ratelimit_headers``
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
