"""A tap on a relayed event stream (Server-Sent Events, or Ollama's NDJSON lines): finds the
token usage, hides the usage chunk that the gateway asked for on the client's behalf, counts
token events where no usage comes, and renames the served model to its public name.

It works on whole events (SSE: ended by an empty line, whatever the line endings; NDJSON: one
line): a chunk boundary inside an event delays only that event's bytes until the rest arrives;
nothing else is held back. Bytes are relayed unchanged, but for the hidden usage chunk and the
rename.

Bounded: each byte is scanned for an event end once (a held partial event is not rescanned when
more arrives), and a partial event longer than ``max_event`` raises ``EventTooLarge`` (the
relay then ends the stream with an error event) instead of being held without limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec

from gateway.proxy.usage import EVENT_RULES, AnswerShape, Usage, usage_of_event

MAX_EVENT_BYTES = 1 << 20
"""The longest one event may be while it is incomplete (a token chunk is well under 1 KiB)."""


class EventTooLarge(ValueError):
    """The backend sent more than the cap without ending an event."""


class _Chunk(msgspec.Struct):
    choices: list[msgspec.Raw] = []


_chunk = msgspec.json.Decoder(_Chunk)
# An event ends at an empty line; lines end in CRLF, LF or CR (the SSE spec allows all three, and
# some servers send CRLF). Most servers send LF only, which has a faster path.
_LF_END = b"\n\n"
_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")  # a CRLF is one line end
_LINE = re.compile(rb"\r\n|\n|\r")
_LONGEST_END = 4  # \r\n\r\n: an end that straddles two chunks starts this close to the old end


class UsageTap:
    __slots__ = (
        "_max_event",
        "_ndjson",
        "_pending",
        "_rename",
        "_rules",
        "_shape",
        "_strip_usage",
        "chunks",
        "usage",
    )

    def __init__(
        self,
        shape: AnswerShape = AnswerShape.OPENAI,
        *,
        strip_usage: bool,
        ndjson: bool = False,
        rename: Callable[[bytes], bytes] | None = None,
        max_event: int = MAX_EVENT_BYTES,
    ) -> None:
        self._shape = shape
        self._rules = EVENT_RULES[shape]
        self._strip_usage = strip_usage and shape is AnswerShape.OPENAI
        self._ndjson = ndjson
        self._rename = rename
        self._max_event = max_event
        self._pending = bytearray()
        self.chunks = 0  # events carrying a token: about one token each where no usage comes
        self.usage = Usage()

    @property
    def prompt_tokens(self) -> int | None:
        return self.usage.input_tokens

    @property
    def completion_tokens(self) -> int | None:
        return self.usage.output_tokens

    def feed(self, data: bytes) -> bytes:
        """Bytes to send to the client now, from ``data`` and what was pending."""
        pending = self._pending
        scanned = max(0, len(pending) - _LONGEST_END + 1)
        pending += data
        end = self._last_event_end(pending, scanned)
        if end < 0:
            complete = b""
        else:
            complete = bytes(pending[:end])
            del pending[:end]
        if len(pending) > self._max_event:
            pending.clear()
            raise EventTooLarge(
                f"the backend sent over {self._max_event} bytes without ending an event"
            )
        return self._pass(complete) if complete else b""

    def flush(self) -> bytes:
        """What is left when the stream ends: an event without its empty line, if any."""
        rest = bytes(self._pending)
        self._pending.clear()
        return self._pass(rest) if rest else b""

    def _last_event_end(self, buffer: bytearray, start: int) -> int:
        """Where the last complete event of ``buffer`` ends (searching from ``start``), or -1."""
        if self._ndjson:
            end = buffer.rfind(b"\n", start)
            return end if end < 0 else end + 1
        if buffer.find(b"\r", start) < 0:
            end = buffer.rfind(_LF_END, start)
            return end if end < 0 else end + 2
        last = -1
        for match in _END.finditer(buffer, start):
            # A CR that ends the buffer may be the first half of a CRLF: wait for the next byte.
            if match.end() < len(buffer) or not buffer.endswith(b"\r"):
                last = match.end()
        return last

    def _pass(self, events: bytes) -> bytes:
        rules = self._rules
        if rules.has_usage.search(events) is None:
            # The common case: plain token chunks; count them without decoding any JSON.
            self.chunks += len(rules.has_token.findall(events))
            return self._renamed(events)
        out = []
        for event, end in self._split(events):
            if rules.has_usage.search(event) is None:  # only a usage event is worth decoding
                self.chunks += len(rules.has_token.findall(event))
                out.append(event + end)
            else:
                out.append(self._filter(event, end))
        return self._renamed(b"".join(out))

    def _split(self, events: bytes) -> list[tuple[bytes, bytes]]:
        """``events`` as (event, its end) pairs."""
        if self._ndjson:
            parts = events.split(b"\n")
            return [(part, b"\n") for part in parts[:-1]] + [(parts[-1], b"")]
        if b"\r" in events:
            parts, ends = _END.split(events), [*_END.findall(events), b""]
        else:
            parts = events.split(_LF_END)
            ends = [*(_LF_END for _ in parts[1:]), b""]
        return list(zip(parts, ends, strict=True))

    def _filter(self, event: bytes, end: bytes) -> bytes:
        data = event if self._ndjson else _data_of(event)
        if data is None or data == b"[DONE]":
            return event + end
        self.chunks += len(self._rules.has_token.findall(event))
        usage = usage_of_event(self._shape, data)
        if usage is None:
            return event + end
        self.usage = self.usage.merged(usage)
        if self._strip_usage and not _has_choices(data):
            return b""
        return event + end

    def _renamed(self, data: bytes) -> bytes:
        return self._rename(data) if self._rename is not None and data else data


def _has_choices(data: bytes) -> bool:
    try:
        return bool(_chunk.decode(data).choices)
    except (msgspec.DecodeError, RecursionError):
        return True


def _data_of(event: bytes) -> bytes | None:
    split = _LINE.split(event) if b"\r" in event else event.split(b"\n")
    lines = [line[5:].lstrip() for line in split if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)
