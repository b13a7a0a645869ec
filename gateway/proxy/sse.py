"""A tap on a relayed Server-Sent Events stream: finds the token usage, hides the usage chunk
that the gateway asked for on the client's behalf, counts chunks where no usage comes.

It works on whole events (ended by an empty line, whatever the line endings): a chunk boundary
inside an event delays only that event's bytes until the rest arrives; nothing else is held back.
Bytes are relayed unchanged, but for the hidden usage chunk.
"""

from __future__ import annotations

import re

import msgspec

from gateway.proxy.usage import Usage


class _Chunk(msgspec.Struct):
    choices: list[msgspec.Raw] = []
    usage: Usage | None = None


_decoder = msgspec.json.Decoder(_Chunk)
# An event ends at an empty line; lines end in CRLF, LF or CR (the SSE spec allows all three, and
# some servers send CRLF). Most servers send LF only, which has a faster path.
_LF_END = b"\n\n"
_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")  # a CRLF is one line end
_LINE = re.compile(rb"\r\n|\n|\r")
# Servers send `"usage": null` on every chunk once usage is asked for; only an object matters.
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
# A token chunk: non-empty choices (comments, pings, [DONE] and the usage chunk have none).
_HAS_CHOICE = re.compile(rb'"choices"\s*:\s*\[\s*\{')


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
        end = _last_event_end(buffer)
        if end < 0:
            self._pending = buffer
            return b""
        complete, self._pending = buffer[:end], buffer[end:]
        return self._pass(complete)

    def flush(self) -> bytes:
        """What is left when the stream ends: an event without its empty line, if any."""
        rest, self._pending = self._pending, b""
        return self._pass(rest) if rest else b""

    def _pass(self, events: bytes) -> bytes:
        if _HAS_USAGE.search(events) is None:
            # The common case: plain token chunks; count them without decoding any JSON.
            self.chunks += len(_HAS_CHOICE.findall(events))
            return events
        if b"\r" in events:
            parts, ends = _END.split(events), [*_END.findall(events), b""]
        else:
            parts = events.split(_LF_END)
            ends = [*(_LF_END for _ in parts[1:]), b""]
        out = []
        for event, end in zip(parts, ends, strict=True):
            if _HAS_USAGE.search(event) is None:  # only the usage chunk is worth decoding
                self.chunks += len(_HAS_CHOICE.findall(event))
                out.append(event + end)
            else:
                out.append(self._filter(event, end))
        return b"".join(out)

    def _filter(self, event: bytes, end: bytes) -> bytes:
        data = _data_of(event)
        if data is None or data == b"[DONE]":
            return event + end
        try:
            chunk = _decoder.decode(data)
        except msgspec.DecodeError:
            return event + end
        if chunk.choices:
            self.chunks += 1
        if chunk.usage is not None:
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens
            if self._strip_usage and not chunk.choices:
                return b""
        return event + end


def _last_event_end(buffer: bytes) -> int:
    """Where the last complete event of ``buffer`` ends, or -1."""
    if b"\r" not in buffer:
        end = buffer.rfind(_LF_END)
        return end if end < 0 else end + 2
    last = -1
    for match in _END.finditer(buffer):
        # A CR that ends the buffer may be the first half of a CRLF: wait for the next byte.
        if match.end() < len(buffer) or not buffer.endswith(b"\r"):
            last = match.end()
    return last


def _data_of(event: bytes) -> bytes | None:
    split = _LINE.split(event) if b"\r" in event else event.split(b"\n")
    lines = [line[5:].lstrip() for line in split if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)
