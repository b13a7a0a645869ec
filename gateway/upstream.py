"""The gateway's HTTP/1.1 client to its backends: keep-alive connections pooled per backend, a
request written in one call, its answer parsed by httptools (llhttp, Node.js's parser) as it
arrives and handed over whole or in the pieces that came.

Why not aiohttp's ``ClientSession``, which the gateway used before: it was half of what a bare
aiohttp pass-through proxy spends on a request (``python -m loadtest.bench_instructions``: 595k
instructions a JSON request, 299k for the same proxy on this client), for a URL object, header
merging, a cookie jar, payload objects, trace hooks and several coroutine layers, none of which a
proxy needs. The server side stays aiohttp's.

What a caller gets when an exchange fails, to decide what is safe to do again:
- ``ConnectFailed``: no connection could be opened, so nothing was sent;
- ``Broken``: the exchange broke once the request was written (reset, early end, an answer the
  parser refuses), so the server may have acted on it.
A pooled connection found closed before the request is written to it (the server closed it
while it was idle) is replaced by a fresh one: nothing was sent on it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

# Idle connections are dropped before the backend closes them (uvicorn, under vLLM and SGLang,
# keeps them 5 s): a request written to a connection the server is closing is lost.
KEEPALIVE_S = 4.0
# A streamed answer's bytes waiting for the client beyond this pause reading from the backend.
_HIGH_WATER = 256 * 1024
# An answer's header block may be this long (aiohttp's client allowed 8 KiB a line); llhttp
# itself sets no limit.
_MAX_HEAD_BYTES = 64 * 1024
# llhttp's state for the message being read: what the next awaited step waits for.
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3


class ConnectFailed(Exception):
    """No connection to the backend could be opened: nothing was sent."""


class _Unsent(Exception):
    """The connection was closed before the request was written to it: nothing was sent."""


class Broken(Exception):
    """The exchange broke after the request was written."""


class Upstreams:
    """One pool of connections per backend base URL, for the gateway's lifetime."""

    def __init__(self, keepalive_s: float = KEEPALIVE_S) -> None:
        self._keepalive_s = keepalive_s
        self._pools: dict[str, Pool] = {}

    def pool(self, base_url: str) -> Pool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = Pool(base_url, self._keepalive_s)
        return pool

    async def sweep(self) -> None:
        """Close connections left idle past the keep-alive, every keep-alive period, for as
        long as it runs (a request drops the stale ones of its pool anyway: this is for the
        pools no request comes to)."""
        while True:
            await asyncio.sleep(self._keepalive_s)
            for pool in self._pools.values():
                pool.drop_stale()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


class Pool:
    """Keep-alive connections to one backend; the most recently used is taken first, so the
    others age out under light load instead of all staying barely alive."""

    __slots__ = ("_connect_args", "_head_start", "_idle", "_keepalive_s", "base_path")

    def __init__(self, base_url: str, keepalive_s: float = KEEPALIVE_S) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        named = f"[{host}]" if ":" in host else host  # an IPv6 literal
        authority = named if port == (443 if tls else 80) else f"{named}:{port}"
        context = ssl.create_default_context() if tls else None
        self._connect_args = (host, port, context)
        self._keepalive_s = keepalive_s
        # Every request names its own host; answers come uncompressed (the gateway reads
        # their usage block); the rest of the head is the caller's.
        self._head_start = f"\r\nHost: {authority}\r\nAccept-Encoding: identity\r\n"
        self._idle: deque[Connection] = deque()
        self.base_path = parts.path.rstrip("/")

    async def send(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        connect_s: float,
    ) -> Connection:
        """Write the request and wait for the answer's head; the connection returned holds the
        answer until ``release``. ``target`` is the path and query after the base path. A
        pooled connection found closed before the request is written is replaced by a fresh
        one; nothing is sent twice once written."""
        head = self._head(method, target, headers, body)
        data = head + body if body else head
        connection = self._take()
        if connection is not None:
            try:
                connection.write(data)
            except _Unsent:
                connection = None
        if connection is None:
            connection = await self._connect(connect_s)
            try:
                connection.write(data)
            except _Unsent:
                raise ConnectFailed("the backend closed the connection as it opened") from None
        try:  # the head awaited here, not in a coroutine of the connection's: a layer less
            while connection._state == _HEAD:
                await connection._waiting()
        except BaseException:
            connection.abort()  # the backend sees its client leave (vLLM aborts the request)
            raise
        return connection

    def release(self, connection: Connection) -> None:
        """Give the connection back once its answer is done with: kept for the next request
        if the answer was read to its end and both sides keep it open, else closed (which
        also tells the backend that nobody reads the rest)."""
        if connection.reusable():
            connection.reset()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.abort()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()

    def drop_stale(self) -> None:
        idle = self._idle
        stale = time.monotonic() - self._keepalive_s
        while idle and idle[0].idle_since < stale:
            idle.popleft().abort()

    def _take(self) -> Connection | None:
        self.drop_stale()
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, connect_s: float) -> Connection:
        host, port, context = self._connect_args
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"no connection within {connect_s:g}s") from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc) or type(exc).__name__) from exc
        return connection

    def _head(self, method: str, target: str, headers: CIMultiDict[str], body: bytes) -> bytes:
        lines = [method, " ", self.base_path, target, " HTTP/1.1", self._head_start]
        for name, value in headers.items():
            lines += (name, ": ", value, "\r\n")
        sized = bool(body) or method in ("POST", "PUT", "PATCH")
        if sized:
            lines += ("Content-Length: ", str(len(body)), "\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        # One count over the whole head: no name or value may carry a line of its own (the
        # request line, Host, Accept-Encoding and the blank line are four).
        if head.count("\n") != 4 + len(headers) + sized:
            raise ValueError("a header name or value holds a line break")
        return head.encode("utf-8", "surrogateescape")


class Connection(asyncio.Protocol):
    """One connection to a backend, and the answer being read on it (its status, headers and
    body), which ``Pool.send`` hands to the caller."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._fields: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._parts: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._whole = False  # the body is read whole: no pausing
        self._state = _IDLE
        self._until_close = False  # a body without a length: it ends with the connection
        self._informational = False
        self._keep_alive = False
        self._error: Exception | None = None
        self.closed = False
        self.idle_since = 0.0
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self.content_type = ""

    # -- asyncio's side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE or self._state == _DONE:
            self._broke(Broken("the backend sent bytes with no request waiting"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broke(Broken("the backend switched protocols"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, Broken):  # raised by a callback of ours
                self._broke(cause)
            else:
                self._broke(Broken(f"the backend's answer is not valid HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _BODY and self._until_close and exc is None:
            self._state = _DONE
        elif self._state in (_HEAD, _BODY) and self._error is None:
            reason = f": {exc}" if exc is not None else ""
            self._error = Broken(f"the backend closed the connection mid-answer{reason}")
        self._wake()

    # -- llhttp's callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _DONE:  # more bytes after the whole answer, in the same read
            raise Broken("the backend sent a second answer to one request")
        self._fields = []
        self._head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise Broken(f"the backend's answer has over {_MAX_HEAD_BYTES} bytes of headers")
        self._fields.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and its kind: the answer proper follows
            self._informational = True
            return
        self.status = status
        self.headers = headers = CIMultiDict(self._fields)
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        kind = headers.get("Content-Type")
        self.content_type = kind.split(";", 1)[0].strip().lower() if kind else ""
        self._until_close = (
            length is None
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
        )
        # asked now: llhttp forgets it once the message is complete
        self._keep_alive = self._parser.should_keep_alive()
        self._state = _BODY
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._whole and not self._paused:
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._state = _DONE
        self._wake()

    # -- the caller's side ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            raise _Unsent("the pooled connection was closed before the request was written")
        self._state = _HEAD
        transport.write(data)

    async def read(self) -> bytes:
        """The whole body."""
        self._whole = True
        self._resume()
        while self._state != _DONE:
            await self._waiting()
        return self._take_parts()

    async def chunk(self) -> bytes:
        """What arrived of the body since the last call, waiting for some; b"" at its end."""
        while not self._parts and self._state != _DONE:
            await self._waiting()
        return self._take_parts()

    def reusable(self) -> bool:
        return self._state == _DONE and self._keep_alive and not self.closed

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def reset(self) -> None:
        """Ready for the next request on this connection."""
        self._state = _IDLE
        self._parts = []
        self._buffered = 0
        self._whole = False
        self._until_close = False

    # -- helpers ----------------------------------------------------------------------------

    def _waiting(self) -> asyncio.Future[None]:
        """A future the next event on the connection resolves; raises what broke it."""
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a cancelled wait leaves its future done
                waiter.set_result(None)

    def _take_parts(self) -> bytes:
        parts = self._parts
        if not parts:
            return b""
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._parts = []
        self._buffered = 0
        self._resume()
        return data

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._transport is not None and not self.closed:
                self._transport.resume_reading()

    def _broke(self, error: Broken) -> None:
        if self._error is None:
            self._error = error
        self.abort()
        self._wake()
