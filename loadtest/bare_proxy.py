"""The floor any Python proxy pays: a minimal aiohttp pass-through with one pooled session and
chunk-by-chunk relay, and nothing else (no auth, limits, admission, metrics or logs).
Run: ``python -m loadtest.bare_proxy --port 9002 --upstream http://127.0.0.1:9001``."""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


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


def build(upstream: str) -> web.Application:
    app = web.Application()
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
    args = parser.parse_args()
    uvloop.install()
    web.run_app(build(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
