"""The catch-all of the request path: an exception no step mapped becomes an answer, never
aiohttp's bare 500 with a traceback per request.

Decoding failures of the client's input (invalid UTF-8, JSON nested past the decoder's
recursion limit, a body msgspec refuses) are the client's: 400. Anything else is a bug: 500,
counted in ``kvgate_internal_errors_total``; the first of each exception type is logged with
its traceback, then at most one line per ``_LOG_EVERY_S`` with how many were not logged.
"""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from gateway.core.types import Outcome
from gateway.proxy import responses
from gateway.proxy.apis.common import TOO_DEEP
from gateway.state import Gateway

log = logging.getLogger("kvgate")

_LOG_EVERY_S = 10.0
_INPUT_ERRORS = (UnicodeError, RecursionError, msgspec.DecodeError)


class _Throttle:
    """When the last line was logged, the types seen, and what was not logged since."""

    __slots__ = ("last_s", "seen", "unlogged")

    def __init__(self) -> None:
        self.last_s = float("-inf")
        self.seen: set[type[BaseException]] = set()
        self.unlogged = 0


_throttle = _Throttle()


def failure(exc: Exception, gw: Gateway) -> web.Response:
    """The answer to an exception a step raised (see the module docstring)."""
    if isinstance(exc, _INPUT_ERRORS):
        message = TOO_DEEP if isinstance(exc, RecursionError) else _input_message(exc)
        return responses.error(Outcome.BAD_REQUEST, message, should_retry=False)
    gw.metrics.internal_errors.inc()
    _log(exc, gw.clock.now())
    message = "The gateway failed on this request; it was logged. Retrying may help."
    return responses.error(Outcome.INTERNAL_ERROR, message)


def _input_message(exc: Exception) -> str:
    if isinstance(exc, UnicodeError):
        return "the request is not valid UTF-8 where text is expected"
    return f"the body is not valid JSON: {str(exc)[:200]}"


def _log(exc: Exception, now: float) -> None:
    kind = type(exc)
    if kind not in _throttle.seen:
        _throttle.seen.add(kind)
        log.error("unexpected %s on a request", kind.__name__, exc_info=exc)
        return
    if now - _throttle.last_s < _LOG_EVERY_S:
        _throttle.unlogged += 1
        return
    log.error(
        "unexpected %s on a request (%d more since the last line)",
        kind.__name__,
        _throttle.unlogged,
    )
    _throttle.last_s = now
    _throttle.unlogged = 0


class MalformedRequests(logging.Filter):
    """aiohttp logs each request its parser refuses (answered 400) at ERROR with a traceback:
    a log flood any client can cause. This filter turns them into one WARNING line, without
    the traceback, at most every ``_LOG_EVERY_S``, with how many were dropped."""

    def __init__(self) -> None:
        super().__init__()
        self._last_s = float("-inf")
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Error handling request"):
            return True
        if record.created - self._last_s < _LOG_EVERY_S:
            self._dropped += 1
            return False
        cause = record.exc_info[1] if record.exc_info else None
        first = str(cause).splitlines()[0] if cause is not None else ""
        record.msg = "malformed HTTP request refused: %s %s (%d more since the last line)"
        record.args = (type(cause).__name__, first[:200], self._dropped)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        self._last_s = record.created
        self._dropped = 0
        return True


def quiet_malformed_requests() -> None:
    """Install ``MalformedRequests`` on aiohttp's server logger, once."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())
