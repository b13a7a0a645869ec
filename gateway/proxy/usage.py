"""Token usage as a backend reports it in its answer. Pure: msgspec only, no I/O.

A JSON answer carries a ``usage`` block (``usage_of_json`` reads it from the whole body); a long
answer relayed as a stream is read from its end, where the block is (``usage_in_tail``); an SSE
stream carries it in its last chunk (``gateway.proxy.sse`` decodes that with ``Usage``).
"""

from __future__ import annotations

import re

import msgspec


class Usage(msgspec.Struct, frozen=True, gc=False):
    """The counts every OpenAI-compatible server reports, in tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Body(msgspec.Struct, gc=False):
    usage: Usage | None = None


_body_decoder = msgspec.json.Decoder(_Body)
_usage_decoder = msgspec.json.Decoder(Usage)

_BACKSLASH, _QUOTE, _OPEN, _CLOSE = 0x5C, 0x22, 0x7B, 0x7D
# the key with its object: a string value "usage" (a token's text in logprobs) is not the key
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')


def usage_of_json(body: bytes) -> Usage | None:
    """The top-level ``usage`` of a JSON answer; None when there is none or it is not JSON."""
    try:
        return _body_decoder.decode(body).usage
    except msgspec.DecodeError:
        return None


def usage_in_tail(tail: bytes) -> Usage | None:
    """The last ``"usage": {...}`` object in the end of a JSON body, if it is whole there.

    The object is found by matching braces outside strings from the key on, so a brace or a
    quote inside a string value does not end it early; a tail cut inside the object gives None.
    """
    start = max((key.end() - 1 for key in _USAGE_KEY.finditer(tail)), default=-1)
    if start < 0:
        return None
    end = _object_end(tail, start)
    if end is None:
        return None
    try:
        return _usage_decoder.decode(tail[start:end])
    except msgspec.DecodeError:
        return None


def _object_end(data: bytes, start: int) -> int | None:
    """Index just past the object that opens at ``start``; None when ``data`` ends first."""
    depth = 0
    quoted = escaped = False
    for i in range(start, len(data)):
        char = data[i]
        if quoted:
            if escaped:
                escaped = False
            elif char == _BACKSLASH:
                escaped = True
            elif char == _QUOTE:
                quoted = False
        elif char == _QUOTE:
            quoted = True
        elif char == _OPEN:
            depth += 1
        elif char == _CLOSE:
            depth -= 1
            if depth == 0:
                return i + 1
    return None
