"""What one client may hold open: caps on connections (per client address and in all) and
deadlines on each phase of a connection's life, enforced below aiohttp's request handler.

aiohttp's server closes nothing that sends slowly or not at all (its keep-alive timer runs
only between requests), so each accepted connection is wrapped in a ``GuardedProtocol`` that
forwards every event to aiohttp's own handler and closes the socket when a phase outlives
its deadline:

- first request: from accept to the first byte of a request;
- headers: from a request's first byte to its headers being parsed (slow headers);
- idle: from the end of an answer to the first byte of the next request (keep-alive);
- body: the request path reads a body within ``body_s`` (``Exchange`` enforces it, a 408).

A connection past a cap is answered ``503`` with ``Connection: close`` before aiohttp sees
it, so it costs one write and a close. The global cap defaults to half the process's soft
file limit, read at start: the other half is for upstream sockets, Redis and files.
"""

from __future__ import annotations

import asyncio
import enum
import resource
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from gateway.policy.compile import ConnectionLimits
from gateway.proxy.failures import quiet_malformed_requests

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# File descriptors a gateway needs besides client sockets when the cap is "auto": upstream
# sockets (one per request in flight), Redis, the policy file, logs.
_AUTO_SHARE = 0.5


def open_files_limit() -> int:
    """The process's soft RLIMIT_NOFILE (the one ``accept`` fails beyond)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def global_cap(limits: ConnectionLimits, files: int) -> int:
    """The most client connections to hold open, always below ``files``."""
    auto = max(1, int(files * _AUTO_SHARE))
    return auto if limits.max_open is None else max(1, min(limits.max_open, files - 16))


class Phase(enum.Enum):
    WAITING = "first_request"  # accepted, nothing received
    HEADERS = "headers"  # a request's first bytes arrived, headers not parsed yet
    BUSY = "busy"  # a request is being handled: no connection deadline
    IDLE = "idle"  # between requests (keep-alive)


# Enum members read on every request, bound once: on Python 3.11 reading one off its class
# (``Phase.BUSY``) goes through the enum metaclass's ``__getattr__`` hook, near a thousand
# instructions each (3.12 dropped the hook).
_WAITING, _HEADERS, _BUSY, _IDLE = Phase.WAITING, Phase.HEADERS, Phase.BUSY, Phase.IDLE

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Retry-After: 1\r\n"
    b"x-kvgate-outcome: connections_full\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


def _refusal(reason: str) -> bytes:
    message = (
        b'{"error":{"message":"Too many open connections (%s); retry on an open one or later.",'
        b'"type":"overloaded","param":null,"code":"connections_full"}}' % reason.encode()
    )
    return _REFUSAL % (len(message), message)


class ConnectionGuard:
    """Counts open connections by client address and arms each one's deadline.

    ``refused(reason)`` is called for each connection refused at a cap ("per_client",
    "global"), ``timed_out(phase)`` for each closed at a deadline.
    """

    def __init__(
        self,
        limits: ConnectionLimits,
        *,
        refused: Callable[[str], None] = lambda reason: None,
        timed_out: Callable[[str], None] = lambda phase: None,
        files: int | None = None,
    ) -> None:
        self.limits = limits
        self.max_open = global_cap(limits, open_files_limit() if files is None else files)
        self.by_client: Counter[str] = Counter()
        self.open = 0
        self.refused = refused
        self.timed_out = timed_out
        self.by_transport: dict[asyncio.BaseTransport, GuardedProtocol] = {}

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` wrapping ``inner`` (aiohttp's
        ``web.Server``)."""
        return lambda: GuardedProtocol(self, inner)

    def admit(self, client: str) -> str | None:
        """None and the connection counted, or the cap it is over."""
        if self.open >= self.max_open:
            return "global"
        if self.by_client[client] >= self.limits.per_client:
            return "per_client"
        self.open += 1
        self.by_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        left = self.by_client[client] - 1
        if left > 0:
            self.by_client[client] = left
        else:
            del self.by_client[client]

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` with its connection marked busy while it runs (no deadline then) and
        idle after. Each route's handler is wrapped rather than the app given a middleware: an
        aiohttp middleware costs two more coroutine layers per request (aiohttp then adds one
        of its own, which tracks the current app)."""
        by_transport = self.by_transport
        limits = self.limits

        async def guarded(request: web.Request) -> web.StreamResponse:
            transport = request.transport
            connection = by_transport.get(transport) if transport is not None else None
            if connection is None:
                return await handler(request)
            connection.enter(_BUSY, None)
            try:
                return await handler(request)
            finally:
                connection.enter(_IDLE, limits.idle_s)

        return guarded


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's request handler for one connection, behind a cap and a phase deadline."""

    def __init__(self, guard: ConnectionGuard, inner: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make_inner = inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._client = ""
        self._phase = _WAITING
        self._ends: float | None = None  # the phase's deadline (loop time); None while busy
        self._deadline: asyncio.TimerHandle | None = None
        self._armed = 0.0  # when ``_deadline`` fires
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream server's transport (uvloop's does not subclass asyncio.Transport)
        transport = self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        over = self._guard.admit(self._client)
        if over is not None:
            self._guard.refused(over)
            transport.write(_refusal(over))
            transport.close()
            return
        self._guard.by_transport[transport] = self
        inner = self._inner = self._make_inner()
        inner.connection_made(transport)
        self.enter(_WAITING, self._guard.limits.first_request_s)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        phase = self._phase
        if phase is _WAITING or phase is _IDLE:
            self.enter(_HEADERS, self._guard.limits.headers_s)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        inner = self._inner
        if inner is None:
            return
        self._inner = None
        if self._transport is not None:
            self._guard.by_transport.pop(self._transport, None)
        self._guard.release(self._client)
        inner.connection_lost(exc)

    def enter(self, phase: Phase, seconds: float | None) -> None:
        """Move to ``phase``, which ends ``seconds`` from now (None: no deadline, while busy).

        A request moves through three phases, so a timer each would cost three timer handles
        per request. The one timer is re-armed only for a deadline earlier than the one it is
        armed for; when it fires early (the deadline moved later, or went away while busy) it
        sleeps again until the current deadline, if any: a connection in steady use costs a
        timer about once per deadline's length, not per request."""
        self._phase = phase
        if seconds is None or self._inner is None:  # busy, or the connection is gone
            self._ends = None
            return
        ends = self._ends = self._loop.time() + seconds
        if self._deadline is None or ends < self._armed:
            self._arm(ends)

    def _arm(self, at: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._armed = at
        self._deadline = self._loop.call_at(at, self._expire)

    def _disarm(self) -> None:
        self._ends = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        ends = self._ends
        if ends is None or self._transport is None:
            return
        if self._loop.time() < ends:  # the deadline moved later since the timer was armed
            self._arm(ends)
            return
        self._guard.timed_out(self._phase.value)
        # abort, not close: a peer that reads nothing must not keep the socket in our table
        self._transport.abort()


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections pass a ``ConnectionGuard``; the runner's cleanup stops
    it like any site."""

    __slots__ = ("_bound", "_guard", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        backlog: int,
        *,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._bound = port
        self._guard = guard
        self._reuse_port = reuse_port  # the workers of ``kvgate run --workers N`` share the port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._bound}"

    @property
    def port(self) -> int:
        return self._bound

    async def start(self) -> None:
        await super().start()
        quiet_malformed_requests()
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is set up before its site starts")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )
        if self._server.sockets:
            self._bound = self._server.sockets[0].getsockname()[1]
