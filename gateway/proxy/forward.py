"""Send one request to a backend and relay the answer to the client as it arrives.

Streams (SSE, or any body without a length) are written to the client chunk by chunk; bodies with
a length are read whole (they are small JSON answers) and returned with their headers. Failures
before the response starts become exceptions the handler maps to 502/504; after it started, the
stream ends with an SSE error event, which the OpenAI SDKs raise as an API error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from gateway.core.clock import Clock
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.proxy.deadline import Deadline
from gateway.proxy.headers import downstream_headers
from gateway.proxy.sse import UsageTap

_BUFFER_LIMIT = 8 * 1024 * 1024  # a body this long or longer is streamed, not read whole
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Body(msgspec.Struct):
    usage: _Usage | None = None


_body_decoder = msgspec.json.Decoder(_Body)


@dataclass(slots=True)
class Relay:
    """What happened upstream, for settlement, the backend's health and the access log."""

    status: int = 0
    first_byte_at: float | None = None  # clock time the response headers arrived
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    complete: bool = False  # the whole answer reached the client
    client_gone: bool = False  # the client left mid-answer: not the backend's fault
    streamed: bool = False  # an SSE stream: first_byte_at is the first output token
    error: str | None = None  # what broke upstream, for the access log
    failure: str | None = None  # "5xx", "oom" or "timeout": fed back to the backend's state

    @property
    def output_tokens(self) -> int | None:
        """Real output tokens: the usage block, else one per streamed chunk, else unknown."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return self.chunks if self.chunks else None


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: str,
    *,
    body: bytes,
    headers: CIMultiDict[str],
    timeouts: Timeouts,
    strip_usage: bool,
    relay: Relay,
    clock: Clock,
    extra_headers: Mapping[str, str],
    on_start: Callable[[], None],
) -> web.StreamResponse:
    """Proxy to ``url``; fills ``relay`` as it goes (also when it raises). ``extra_headers`` are
    added to the client's response (the gateway's rate-limit headers); ``on_start`` is called
    when the backend's response headers arrive."""
    loop = asyncio.get_running_loop()
    end_by = loop.time() + timeouts.total_s
    started = False
    which = "first byte"
    deadline = Deadline(min(loop.time() + timeouts.first_byte_s, end_by))
    try:
        upstream = await _send_request(request.method, session, url, body, headers, timeouts)
        async with upstream:
            relay.status = upstream.status
            relay.first_byte_at = clock.now()
            on_start()
            if upstream.status >= 500:
                relay.failure = "5xx"
            out_headers = downstream_headers(upstream.headers.items())
            out_headers.update(extra_headers)
            length = upstream.content_length
            is_sse = upstream.content_type == "text/event-stream"
            if not is_sse and length is not None and length < _BUFFER_LIMIT:
                which = "total"
                deadline.move(end_by)
                data = await upstream.read()
                _read_usage(relay, upstream, data)
                relay.complete = True
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            which = "idle"
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            try:
                await response.prepare(request)
            except ConnectionError:
                relay.client_gone = True
                return response
            started = True
            relay.streamed = is_sse
            tap = UsageTap(strip_usage=strip_usage) if is_sse else None
            try:
                async for data in upstream.content.iter_any():
                    deadline.move(min(loop.time() + timeouts.idle_s, end_by))
                    out = tap.feed(data) if tap is not None else data
                    if out and not await _send(response, out, relay):
                        break
                else:
                    last = tap.flush() if tap is not None else b""
                    # Everything reached the client once the last bytes are written; a
                    # client that hangs up on [DONE] before the terminating chunk has it.
                    relay.complete = await _send(response, last, relay)
                    await _send(response, None, relay)
            finally:
                # Also when the handler is cancelled (the client left): what was relayed
                # until then was produced, and is settled.
                if tap is not None:
                    _take_tap(relay, tap)
            return response
    except asyncio.CancelledError:
        if not deadline.timed_out():
            raise
        relay.failure = "timeout"
        if loop.time() >= end_by:
            which = "total"
        seconds = {
            "first byte": timeouts.first_byte_s,
            "idle": timeouts.idle_s,
            "total": timeouts.total_s,
        }[which]
        if not started:
            raise UpstreamTimeout(which, seconds) from None
        await _end_stream(response, f"upstream {which} timeout after {seconds:g}s")
        return response
    except aiohttp.ClientError as exc:
        relay.failure = "5xx"
        relay.error = f"{type(exc).__name__}: {exc}"
        if not started:
            raise UpstreamError(f"backend answered badly: {exc}") from exc
        await _end_stream(response, f"backend stream broke: {exc}")
        return response
    finally:
        deadline.close()


async def _send_request(
    method: str,
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: CIMultiDict[str],
    timeouts: Timeouts,
) -> aiohttp.ClientResponse:
    """The upstream request, sent once more on a fresh connection when a pooled one turned out
    to be closing before a byte of the request was written (a keep-alive race under churn)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s)
    retries = 1
    while True:
        try:
            return await session.request(
                method,
                url,
                data=body or None,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to backend: {exc}") from exc
        except aiohttp.ClientConnectionResetError as exc:
            if not retries:
                raise UpstreamConnectError(f"backend connection reset: {exc}") from exc
            retries -= 1


def _read_usage(relay: Relay, upstream: aiohttp.ClientResponse, data: bytes) -> None:
    if upstream.status >= 500:
        relay.failure = "oom" if b"out of memory" in data else "5xx"
        return
    if upstream.status != 200 or upstream.content_type != "application/json":
        return
    try:
        usage = _body_decoder.decode(data).usage
    except msgspec.DecodeError:
        return
    if usage is not None:
        relay.prompt_tokens = usage.prompt_tokens
        relay.completion_tokens = usage.completion_tokens


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
    relay.prompt_tokens = tap.prompt_tokens
    relay.completion_tokens = tap.completion_tokens


async def _end_stream(response: web.StreamResponse, message: str) -> None:
    event = msgspec.json.encode({"error": {"message": message, "type": "upstream_error"}})
    try:
        await response.write(b"data: " + event + b"\n\n")
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        return
