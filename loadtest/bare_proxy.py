"""The floor any Python proxy pays: a minimal aiohttp pass-through with one pooled session and
chunk-by-chunk relay, and nothing else (no auth, limits, admission, metrics or logs).
``--client kvgate`` makes the same proxy with kvgate's own upstream client
(``gateway/upstream.py``) in place of aiohttp's: the strongest simple rival to kvgate
itself, which uses that client.
Run: ``python -m loadtest.bare_proxy --port 9002 --upstream http://127.0.0.1:9001``."""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from gateway.upstream import Pool

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
_CONNECT_S = 10.0


async def relay(
    session: aiohttp.ClientSession, request: web.Request, upstream: str, body: bytes
) -> web.StreamResponse:
    """``request`` sent to the same path on ``upstream``, its answer relayed as it comes
    (bodies with a length whole, others chunk by chunk); hop-by-hop headers dropped."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    async with session.request(
        request.method, upstream + request.path_qs, data=body, headers=headers
    ) as resp:
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        if resp.content_length is not None:
            return web.Response(status=resp.status, body=await resp.read(), headers=out)
        stream = web.StreamResponse(status=resp.status, headers=out)
        await stream.prepare(request)
        async for chunk in resp.content.iter_any():
            await stream.write(chunk)
        await stream.write_eof()
        return stream


async def relay_own(pool: Pool, request: web.Request, body: bytes) -> web.StreamResponse:
    """``relay`` through kvgate's upstream client (which asks for ``identity`` itself)."""
    headers = CIMultiDict(
        (k, v)
        for k, v in request.headers.items()
        if (lower := k.lower()) not in _HOP and lower != "accept-encoding"
    )
    resp = await pool.send(request.method, request.path_qs, headers, body, _CONNECT_S)
    try:
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        if resp.content_length is not None:
            return web.Response(status=resp.status, body=await resp.read(), headers=out)
        stream = web.StreamResponse(status=resp.status, headers=out)
        await stream.prepare(request)
        while chunk := await resp.chunk():
            await stream.write(chunk)
        await stream.write_eof()
        return stream
    finally:
        pool.release(resp)


def build(upstream: str, client: str = "aiohttp") -> web.Application:
    app = web.Application()
    if client == "kvgate":
        pool = Pool(upstream)

        async def handle_own(request: web.Request) -> web.StreamResponse:
            return await relay_own(pool, request, await request.read())

        app.router.add_route("*", "/{tail:.*}", handle_own)
        return app
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await relay(app[session_key], request, upstream, await request.read())

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--upstream", default="http://127.0.0.1:9001")
    parser.add_argument("--client", choices=("aiohttp", "kvgate"), default="aiohttp")
    args = parser.parse_args()
    uvloop.install()
    web.run_app(
        build(args.upstream, args.client),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
