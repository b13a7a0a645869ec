"""A tap on a relayed Server-Sent Events stream: finds the token usage, hides the usage chunk
that the gateway asked for on the client's behalf, counts chunks where no usage comes.

It works on whole events (``\\n\\n``-terminated, as LLM servers send them): a chunk boundary
inside an event delays only that event's bytes until the rest arrives; nothing else is held back.
"""

from __future__ import annotations

import re

import msgspec


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[msgspec.Raw] = []
    usage: _Usage | None = None


_decoder = msgspec.json.Decoder(_Chunk)
_EVENT_END = b"\n\n"
# Servers send `"usage": null` on every chunk once usage is asked for; only an object matters.
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')


class UsageTap:
    __slots__ = ("_pending", "_strip_usage", "chunks", "completion_tokens", "prompt_tokens")

    def __init__(self, *, strip_usage: bool) -> None:
        self._strip_usage = strip_usage
        self._pending = b""
        self.chunks = 0  # events carrying choices: about one token each where no usage comes
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Bytes to send to the client now, from ``data`` and what was pending."""
        buffer = self._pending + data if self._pending else data
        end = buffer.rfind(_EVENT_END)
        if end < 0:
            self._pending = buffer
            return b""
        complete, self._pending = buffer[: end + 2], buffer[end + 2 :]
        if _HAS_USAGE.search(complete) is None:
            # The common case: plain token chunks; count them without decoding any JSON.
            self.chunks += complete.count(_EVENT_END) - complete.count(b"[DONE]")
            return complete
        return b"".join(self._filter(event) for event in complete.split(_EVENT_END) if event)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _filter(self, event: bytes) -> bytes:
        data = _data_of(event)
        if data is None or data == b"[DONE]":
            return event + _EVENT_END
        try:
            chunk = _decoder.decode(data)
        except msgspec.DecodeError:
            return event + _EVENT_END
        if chunk.choices:
            self.chunks += 1
        if chunk.usage is not None:
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens
            if self._strip_usage and not chunk.choices:
                return b""
        return event + _EVENT_END


def _data_of(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)
