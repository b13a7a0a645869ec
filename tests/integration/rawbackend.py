"""A raw asyncio backend for the proxy tests: exact bytes on the wire, for what an aiohttp stub
cannot produce (CRLF events, chunked JSON, interim answers, a connection cut mid-body)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class RawRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def asks_for_usage(self) -> bool:
        """The request asked for the usage chunk at the end of its stream."""
        options = json.loads(self.body).get("stream_options") or {}
        return bool(options.get("include_usage"))


Script = Callable[[asyncio.StreamWriter, RawRequest], Awaitable[None]]


@dataclass
class RawBackend:
    """Answers `GET /health` itself; every other request is handed to `script`, which writes the
    whole answer (status line included); the connection is closed after it."""

    script: Script
    requests: list[RawRequest] = field(default_factory=list)
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # no connection is being served

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.done.set()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()  # idle keep-alive connections: their readers see the end
        await self.done.wait()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.done.clear()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {}
                for item in lines:
                    if item:
                        name, _, value = item.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if target == "/health":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                request = RawRequest(method, target, headers, body)
                self.requests.append(request)
                await self.script(writer, request)
                await writer.drain()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            self.writers.discard(writer)
            if not self.writers:
                self.done.set()


MakeRawBackend = Callable[[Script], Awaitable[RawBackend]]


def head(status: str, *headers: str) -> bytes:
    """A status line and headers, ending with `Connection: close` and the blank line."""
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{lines}Connection: close\r\n\r\n".encode()


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_chunk(i: int) -> dict[str, object]:
    """The `i`-th content chunk of a streamed chat completion, one token `t<i>`."""
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m1",
        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
    }


def sse_event(
    payload: dict[str, object], *, data: bytes = b"data: ", end: bytes = b"\n\n"
) -> bytes:
    return data + json.dumps(payload).encode() + end


USAGE_CHUNK: dict[str, object] = {
    "id": "c",
    "object": "chat.completion.chunk",
    "model": "m1",
    "choices": [],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}
