"""Send one request to a backend and relay the answer to the client as it arrives.

Streams (SSE, or any body without a length) are written to the client chunk by chunk; bodies with
a length are read whole (they are small JSON answers) and returned with their headers. Failures
before the response starts become exceptions the handler maps to 502/504; after it started, the
stream ends with an SSE error event, which the OpenAI SDKs raise as an API error.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from gateway.core.backend import Failure
from gateway.core.clock import Clock
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.policy.compile import UpstreamTimeouts
from gateway.proxy.deadline import Deadline
from gateway.proxy.headers import downstream_headers
from gateway.proxy.sse import EventTooLarge, UsageTap
from gateway.proxy.usage import AnswerShape, Usage, usage_in_tail, usage_of_json
from gateway.upstream import Broken, ConnectFailed, Connection, Pool

_BUFFER_LIMIT = 8 * 1024 * 1024  # a body this long or longer is streamed, not read whole
_TAIL_BYTES = 64 * 1024  # of a streamed JSON body, kept to read its usage block at the end


# Both are made per request: msgspec Structs, whose constructors are C (a dataclass's is Python).
class Answer(msgspec.Struct, frozen=True):
    """How to read and relay an answer: the shape its usage comes in, whether to hide the usage
    chunk the gateway asked for, and the rewrite of the served model name to the public one
    (applied to JSON answers held whole and to each whole stream event)."""

    shape: AnswerShape = AnswerShape.OPENAI
    strip_usage: bool = False
    rename: Callable[[bytes], bytes] | None = None


class Relay(msgspec.Struct, gc=False):
    """What happened upstream, for settlement, the backend's health and the access log."""

    status: int = 0
    first_token_at: float | None = None  # a stream's first event, else its response headers
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    answer_id: str | None = None  # the id the answer gave itself, where the API has one
    chunks: int = 0
    complete: bool = False  # the whole answer reached the client
    client_gone: bool = False  # the client left mid-answer: not the backend's fault
    streamed: bool = False  # an SSE stream
    error: str | None = None  # what broke upstream, for the access log
    failure: Failure | None = None  # fed back to the backend's state

    @property
    def output_tokens(self) -> int | None:
        """Real output tokens: the usage block, else one per streamed chunk, else unknown."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return self.chunks if self.chunks else None


async def forward(
    request: web.Request,
    pool: Pool,
    backend_url: str,
    *,
    body: bytes,
    headers: CIMultiDict[str],
    timeouts: UpstreamTimeouts,
    answer: Answer,
    relay: Relay,
    clock: Clock,
    extra_headers: Mapping[str, str],
    on_start: Callable[[], None],
    on_first_token: Callable[[], None],
) -> web.StreamResponse:
    """Proxy the request to the same path on ``backend_url`` through ``pool`` (its
    connections); fills ``relay`` as it goes (also when it raises). ``extra_headers`` are
    added to the client's response (the gateway's rate-limit headers, named in lower case);
    ``on_start`` is called when the backend's response headers arrive, ``on_first_token``
    when a stream's first event is relayed."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    end_by = now + timeouts.total_s
    first_byte_by = now + timeouts.first_byte_s
    # conditionals, not min(): see ``limits.ratelimit_headers``
    deadline = Deadline(first_byte_by if first_byte_by < end_by else end_by)
    stream = _Stream(request, relay, deadline, timeouts, end_by, answer, on_first_token)
    try:
        try:
            upstream = await pool.send(
                request.method, request.path_qs, headers, body, timeouts.connect_s
            )
        except ConnectFailed as exc:
            raise UpstreamConnectError(f"cannot connect to backend: {exc}") from exc
        try:
            relay.status = upstream.status
            headers_at = clock.now()
            on_start()
            if upstream.status >= 400:
                relay.completion_tokens = 0  # an error answer carries no output
            if upstream.status >= 500:
                relay.failure = "5xx"
            out_headers = downstream_headers(upstream.headers, extra_headers)
            _point_at_gateway(out_headers, backend_url, request)
            length = upstream.content_length
            stream.is_sse = upstream.content_type == "text/event-stream"
            if request.method == "HEAD":
                if length is not None:
                    out_headers["Content-Length"] = str(length)
                relay.complete = True
                relay.first_token_at = headers_at
                return web.Response(status=upstream.status, headers=out_headers)
            if not stream.is_sse and length is not None and length < _BUFFER_LIMIT:
                stream.which = "total"
                deadline.move(end_by)
                data = await upstream.read()
                _read_usage(relay, upstream, data, answer.shape)
                if answer.rename is not None:
                    data = answer.rename(data)
                relay.complete = True
                relay.first_token_at = headers_at
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            return await stream.pass_through(upstream, out_headers, clock)
        finally:
            pool.release(upstream)
    except asyncio.CancelledError:
        if not deadline.timed_out():
            raise
        relay.failure = "timeout"
        if loop.time() >= end_by:
            stream.which = "total"
        seconds = {
            "first byte": timeouts.first_byte_s,
            "idle": timeouts.idle_s,
            "total": timeouts.total_s,
        }[stream.which]
        if stream.response is None:
            raise UpstreamTimeout(stream.which, seconds) from None
        return await stream.broken(f"upstream {stream.which} timeout after {seconds:g}s")
    except EventTooLarge as exc:
        relay.failure = "5xx"
        relay.error = str(exc)
        return await stream.broken(f"backend stream broke: {exc}")
    except Broken as exc:
        relay.failure = "5xx"
        relay.error = f"{type(exc).__name__}: {exc}"
        if stream.response is None:
            raise UpstreamError(f"backend answered badly: {exc}") from exc
        return await stream.broken(f"backend stream broke: {exc}")
    finally:
        deadline.close()


class _Stream:
    """An answer relayed as it arrives (SSE, or a body without a length or too long to hold).

    The idle timeout covers the backend only: it is lifted while the gateway writes to the
    client, so a client reading slowly is not taken for a silent backend."""

    __slots__ = (
        "_answer",
        "_end_by",
        "_on_first_token",
        "_request",
        "_timeouts",
        "deadline",
        "is_sse",
        "relay",
        "response",
        "which",
    )

    def __init__(
        self,
        request: web.Request,
        relay: Relay,
        deadline: Deadline,
        timeouts: UpstreamTimeouts,
        end_by: float,
        answer: Answer,
        on_first_token: Callable[[], None],
    ) -> None:
        self._answer = answer
        self._on_first_token = on_first_token
        self._request = request
        self._timeouts = timeouts
        self._end_by = end_by
        self.relay = relay
        self.deadline = deadline
        self.is_sse = False
        self.which = "first byte"  # the timeout that applies now, to name it when it fires
        self.response: web.StreamResponse | None = None  # once prepared: headers are sent

    async def pass_through(
        self,
        upstream: Connection,
        out_headers: CIMultiDict[str],
        clock: Clock,
    ) -> web.StreamResponse:
        relay = self.relay
        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        try:
            await response.prepare(self._request)
        except ConnectionError:
            relay.client_gone = True
            return response
        self.response = response
        answer = self._answer
        ndjson = upstream.content_type == "application/x-ndjson"
        tap = None
        if self.is_sse or ndjson:
            tap = UsageTap(
                answer.shape, strip_usage=answer.strip_usage, ndjson=ndjson, rename=answer.rename
            )
        relay.streamed = tap is not None
        # The usage block of a JSON body ends it; the tail is enough to find it.
        tail = _Tail() if upstream.status == 200 and tap is None else None
        loop = asyncio.get_running_loop()
        try:
            while data := await upstream.chunk():
                self.which = "idle"
                out = tap.feed(data) if tap is not None else data
                if tail is not None:
                    tail.add(data)
                if out and relay.first_token_at is None:
                    relay.first_token_at = clock.now()
                    self._on_first_token()
                self.deadline.move(self._end_by)
                if out and not await _send(response, out, relay):
                    return response
                idle_by = loop.time() + self._timeouts.idle_s
                self.deadline.move(idle_by if idle_by < self._end_by else self._end_by)
            last = tap.flush() if tap is not None else b""
            if tail is not None:
                _take_usage(relay, usage_in_tail(answer.shape, tail.bytes()))
            # Everything reached the client once the last bytes are written; a client
            # that hangs up on [DONE] before the terminating chunk has it.
            relay.complete = await _send(response, last, relay)
            await _send(response, None, relay)
        finally:
            # Also when the handler is cancelled (the client left): what was relayed until
            # then was produced, and is settled.
            if tap is not None:
                _take_tap(relay, tap)
        return response

    async def broken(self, message: str) -> web.StreamResponse:
        """End an answer the backend broke off: an SSE error event (the SDKs raise it), or,
        for any other body, a cut connection, so the client cannot take it for whole."""
        response = self.response
        if response is None:
            raise RuntimeError("an answer is broken off only once it started")
        if not self.is_sse:
            transport = self._request.transport
            if transport is not None:
                transport.abort()
            return response
        if self._answer.shape is AnswerShape.ANTHROPIC:
            error = {"type": "error", "error": {"type": "api_error", "message": message}}
            event = b"event: error\ndata: " + msgspec.json.encode(error)
        else:
            error = {"error": {"message": message, "type": "upstream_error"}}
            event = b"data: " + msgspec.json.encode(error)
        try:
            await response.write(event + b"\n\n")
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        return response


class _Tail:
    """The last ``_TAIL_BYTES`` of a body, whatever its length."""

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: deque[bytes] = deque()
        self._size = 0

    def add(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        while self._size - len(self._parts[0]) >= _TAIL_BYTES:
            self._size -= len(self._parts.popleft())

    def bytes(self) -> bytes:
        return b"".join(self._parts)


def _point_at_gateway(headers: CIMultiDict[str], backend_url: str, request: web.Request) -> None:
    """Redirects to the backend's own address point at the gateway instead: the client must not
    learn an internal address, nor go around the limits."""
    for name in ("Location", "Content-Location"):
        value = headers.get(name)
        if value is not None and value.startswith(backend_url):
            headers[name] = f"{request.scheme}://{request.host}{value[len(backend_url) :]}"


def _read_usage(relay: Relay, upstream: Connection, data: bytes, shape: AnswerShape) -> None:
    if upstream.status >= 500:
        relay.failure = "oom" if b"out of memory" in data else "5xx"
        return
    if upstream.status == 200 and upstream.content_type == "application/json":
        _take_usage(relay, usage_of_json(shape, data))


def _take_usage(relay: Relay, usage: Usage | None) -> None:
    if usage is not None:
        relay.prompt_tokens = usage.input_tokens
        relay.completion_tokens = usage.output_tokens
        relay.answer_id = usage.answer_id


async def _send(response: web.StreamResponse, data: bytes | None, relay: Relay) -> bool:
    """Write ``data`` (None: end the body) to the client; False when the client has gone."""
    try:
        if data is None:
            await response.write_eof()
        elif data:
            await response.write(data)
    except ConnectionError:
        relay.client_gone = True
        return False
    return True


def _take_tap(relay: Relay, tap: UsageTap) -> None:
    relay.chunks = tap.chunks
    _take_usage(relay, tap.usage)
