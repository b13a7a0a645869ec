"""What a body may cost to parse, checked on its bytes before the full parse: a few C-speed
scans (``bytes.count``, one regular expression), so a hostile body is refused for far less
event-loop time than decoding it would take.

``objects`` counts ``{`` anywhere, strings included: an upper bound on the messages, parts and
other objects the decoder would build. ``depth`` finds arrays opened directly inside each other
(``[[[``, the cheap bomb); deep nesting of other forms fails fast in the decoder at its own
recursion limit (a 400 too). Text length per part is checked after the parse.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.policy.compile import RequestLimits


class LimitExceeded(ValueError):
    """A body over one of ``server.limits``; the message names the limit."""


_WHITESPACE = b" \t\r\n"


def check_body(body: bytes, limits: RequestLimits) -> None:
    objects = body.count(b"{")
    if objects > limits.messages:
        raise LimitExceeded(
            f"the body holds {objects} JSON objects, over this gateway's limit of "
            f"{limits.messages} (server.limits.messages)"
        )
    # a run of ``depth`` brackets needs as many in all: most bodies skip the copy and the search
    if body.count(b"[") >= limits.depth and b"[" * limits.depth in body.translate(
        None, _WHITESPACE
    ):
        raise LimitExceeded(
            f"the body nests JSON deeper than {limits.depth} levels (server.limits.depth)"
        )


def check_texts(texts: Iterable[str], limits: RequestLimits) -> None:
    longest = max(map(len, texts), default=0)
    if longest > limits.part_chars:
        raise LimitExceeded(
            f"a text part has {longest} characters, over this gateway's limit of "
            f"{limits.part_chars} (server.limits.part_chars)"
        )
