"""The SSE usage tap: relays events as they complete, finds usage, hides only the chunk the
gateway asked for, and counts chunks where no usage comes."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy.sse import UsageTap


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


TOKENS = [_event({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}) for i in range(3)]
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}})
DONE = b"data: [DONE]\n\n"
STREAM = b"".join(TOKENS) + USAGE + DONE


def _run(tap: UsageTap, pieces: list[bytes]) -> bytes:
    return b"".join(tap.feed(p) for p in pieces) + tap.flush()


def test_usage_is_read_and_hidden_when_the_gateway_asked_for_it() -> None:
    tap = UsageTap(strip_usage=True)
    assert _run(tap, [STREAM]) == b"".join(TOKENS) + DONE
    assert (tap.prompt_tokens, tap.completion_tokens) == (11, 3)


def test_usage_is_passed_when_the_client_asked_for_it() -> None:
    tap = UsageTap(strip_usage=False)
    assert _run(tap, [STREAM]) == STREAM
    assert tap.completion_tokens == 3


def test_chunks_are_counted_when_no_usage_comes() -> None:
    tap = UsageTap(strip_usage=True)
    _run(tap, [b"".join(TOKENS) + DONE])
    assert tap.completion_tokens is None
    assert tap.chunks == 3


def test_a_complete_event_is_relayed_at_once() -> None:
    tap = UsageTap(strip_usage=True)
    assert tap.feed(TOKENS[0]) == TOKENS[0]
    assert tap.feed(TOKENS[1][:5]) == b""
    assert tap.feed(TOKENS[1][5:]) == TOKENS[1]


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_chunking_gives_the_same_bytes_and_usage(cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(STREAM)]
    pieces = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    tap = UsageTap(strip_usage=True)
    assert _run(tap, pieces) == b"".join(TOKENS) + DONE
    assert tap.completion_tokens == 3


CRLF_STREAM = STREAM.replace(b"\n", b"\r\n")


@given(
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=1, max_value=len(CRLF_STREAM) - 1), max_size=12),
)
def test_any_line_ending_and_chunking_gives_the_same_events_and_usage(
    newline: bytes, cuts: list[int]
) -> None:
    stream = STREAM.replace(b"\n", newline)
    bounds = [0, *sorted(c for c in set(cuts) if c < len(stream)), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    tap = UsageTap(strip_usage=True)
    assert _run(tap, pieces) == (b"".join(TOKENS) + DONE).replace(b"\n", newline)
    assert (tap.prompt_tokens, tap.completion_tokens) == (11, 3)


def test_crlf_events_are_relayed_as_each_completes() -> None:
    tap = UsageTap(strip_usage=True)
    first = TOKENS[0].replace(b"\n", b"\r\n")
    assert tap.feed(first) == first


def test_comments_pings_and_done_are_not_counted_as_tokens() -> None:
    tap = UsageTap(strip_usage=True)
    noise = b": keep-alive\n\nevent: ping\ndata: {}\n\n"
    _run(tap, [noise + TOKENS[0] + noise + TOKENS[1] + DONE])
    assert tap.chunks == 2


def test_a_last_event_without_its_empty_line_is_still_read() -> None:
    tap = UsageTap(strip_usage=True)
    out = _run(tap, [TOKENS[0], USAGE.rstrip(b"\n")])
    assert out == TOKENS[0]
    assert tap.completion_tokens == 3
