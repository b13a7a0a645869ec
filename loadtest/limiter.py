"""The strong simple baseline: a reverse proxy that lets a fixed number of requests be in flight
per backend. Excess requests wait first come, first served; with ``--max-wait`` a request that
waited that long gets 503 with Retry-After. Every path is proxied, streams chunk by chunk.
Run: ``python -m loadtest.limiter --backend http://127.0.0.1:9001 --limit 16 --port 9002``."""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

from loadtest.bare_proxy import relay


def build(backends: Sequence[str], limit: int, max_wait_s: float | None = None) -> web.Application:
    """One slot per allowed request: the queue holds a backend's URL ``limit`` times, and
    ``Queue.get`` serves waiters in arrival order, so acquiring a slot also picks the backend."""
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)
    slots: asyncio.Queue[str] = asyncio.Queue()
    for _ in range(limit):
        for url in backends:
            slots.put_nowait(url.rstrip("/"))

    async def session(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None)
        connector = aiohttp.TCPConnector(limit=0)
        app[session_key] = aiohttp.ClientSession(connector=connector, timeout=timeout)
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            backend = await asyncio.wait_for(slots.get(), max_wait_s)
        except TimeoutError:
            retry = str(max(1, math.ceil(max_wait_s or 1.0)))
            return web.json_response(
                {"error": {"message": "busy", "type": "overloaded"}},
                status=503,
                headers={"Retry-After": retry},
            )
        try:
            return await relay(app[session_key], request, backend, body)
        except aiohttp.ClientConnectorError as exc:  # no answer at all; mid-stream errors abort
            return web.json_response({"error": {"message": str(exc)}}, status=502)
        finally:
            slots.put_nowait(backend)

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", action="append", required=True, help="repeat per backend")
    parser.add_argument("--limit", type=int, required=True, help="requests in flight per backend")
    parser.add_argument("--max-wait", type=float, default=None, help="seconds, then 503")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = build(args.backend, args.limit, args.max_wait)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
