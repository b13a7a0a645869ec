"""The fastest OpenAI-shaped backend we can write in Python: a bare asyncio protocol on uvloop,
so that in the overhead benchmark the proxy under test, not the backend, is the bottleneck.

Answers any POST with a fixed chat completion; with ``"stream": true`` in the body, with
``--chunks`` SSE chunks and ``[DONE]``, all in one write; when the body also names the ``user``
``"paced"``, one event per write in successive loop turns (separate TCP segments, as a server
sends tokens while it decodes them). HTTP/1.1 keep-alive, Content-Length bodies only.
Run: ``python -m loadtest.stub_backend --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import cast

import uvloop

_COMPLETION = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok " * 16},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
    }
).encode()


def _plain() -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(_COMPLETION)}\r\n\r\n"
    )
    return head.encode() + _COMPLETION


def _stream(chunks: int) -> list[bytes]:
    """The response head, then each event in its HTTP chunk, then the last chunk."""
    events = []
    for i in range(chunks):
        chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}], "object": "chunk"}
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    usage = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": chunks}}
    events.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    return [head, *(f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events), b"0\r\n\r\n"]


class _Backend(asyncio.Protocol):
    def __init__(self, plain: bytes, stream: list[bytes]) -> None:
        self._plain = plain
        self._stream = stream
        self._whole_stream = b"".join(stream)
        self._buffer = b""
        self._transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport writes but is not registered as an asyncio.Transport subclass
        self._transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end].lower()
            length = 0
            marker = head.find(b"content-length:")
            if marker >= 0:
                length = int(head[marker + 15 :].split(b"\r\n", 1)[0])
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            streaming = b'"stream": true' in body or b'"stream":true' in body
            if self._transport is None:
                return
            if not streaming:
                self._transport.write(self._plain)
            elif b'"paced"' in body:
                self._paced(0)
            else:
                self._transport.write(self._whole_stream)

    def _paced(self, index: int) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(self._stream[index])
        if index + 1 < len(self._stream):
            asyncio.get_running_loop().call_soon(self._paced, index + 1)


async def serve(host: str, port: int, chunks: int) -> None:
    loop = asyncio.get_running_loop()
    plain, stream = _plain(), _stream(chunks)
    server = await loop.create_server(lambda: _Backend(plain, stream), host, port, backlog=1024)
    print(f"stub backend on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.chunks))


if __name__ == "__main__":
    main()
