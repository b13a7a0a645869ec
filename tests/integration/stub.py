"""A scriptable OpenAI-compatible backend for proxy tests: it records what it received and lets
a test hold a response open (an asyncio.Event) to observe streaming and cancellation; its health
status and its ``/metrics`` page are the test's to set."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StubBackend:
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets a held answer go on
    cancelled: asyncio.Event = field(
        default_factory=asyncio.Event
    )  # the held handler was cancelled
    hold_first_byte: bool = False  # wait for `release` before sending anything
    hold_stream: bool = False  # send the first chunk, then wait for `release`
    completion_tokens: int = 5
    set_cookie: str | None = None  # a Set-Cookie header on every JSON answer
    health_status: int = 200  # 503: loading
    metrics: str | None = None  # served at /metrics when set (else that path is proxied too)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self.metrics is None:
            return await self._any(request)
        return web.Response(text=self.metrics, content_type="text/plain")

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        try:
            response = await self._answer(request, body)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.set_cookie is not None and not response.prepared:
            response.headers["Set-Cookie"] = self.set_cookie
        return response

    async def _answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self.hold_first_byte:
            await self.release.wait()
        if not request.path.startswith("/v1/"):
            return web.json_response({"path": request.path_qs})
        payload = json.loads(body)
        if not payload.get("stream"):
            usage = {"prompt_tokens": 7, "completion_tokens": self.completion_tokens}
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": payload["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi " * 5},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(self.completion_tokens):
            chunk = {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": payload["model"],
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if i == 0 and self.hold_stream:
                await self.release.wait()
        if (payload.get("stream_options") or {}).get("include_usage"):
            final = {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": payload["model"],
                "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": self.completion_tokens},
            }
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
