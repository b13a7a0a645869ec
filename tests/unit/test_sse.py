"""The SSE usage tap: relays events as they complete, finds usage, hides only the chunk the
gateway asked for, and counts chunks where no usage comes."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy.sse import EventTooLarge, UsageTap
from gateway.proxy.usage import AnswerShape


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


def test_a_partial_event_is_scanned_once_and_capped() -> None:
    tap = UsageTap(strip_usage=False, max_event=1000)
    for _ in range(9):
        assert tap.feed(b"x" * 100) == b""
    with pytest.raises(EventTooLarge):
        tap.feed(b"x" * 200)


def test_scanning_is_linear_in_the_bytes_fed() -> None:
    # Fed a byte at a time, an event that never ends costs one pass over its bytes, not one
    # per chunk: a quadratic tap would take minutes here (300k chunks).
    tap = UsageTap(strip_usage=False, max_event=400_000)
    for _ in range(300_000):
        tap.feed(b"y")
    assert tap.feed(b"\n\n") == b"y" * 300_000 + b"\n\n"


def test_an_event_end_split_across_chunks_is_found() -> None:
    for end in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        tap = UsageTap(strip_usage=False)
        event = b"data: {}" + end
        out = b"".join(tap.feed(event[i : i + 1]) for i in range(len(event)))
        assert out + tap.flush() == event


def _sse(name: str, payload: object) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(payload).encode() + b"\n\n"


def test_responses_stream_usage_comes_from_response_completed() -> None:
    stream = (
        _sse(
            "response.created",
            {"type": "response.created", "response": {"id": "r1", "usage": None}},
        )
        + b"".join(
            _sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": "t"})
            for _ in range(4)
        )
        + _sse(
            "response.completed",
            {
                "type": "response.completed",
                "response": {"id": "r1", "usage": {"input_tokens": 8, "output_tokens": 4}},
            },
        )
    )
    tap = UsageTap(AnswerShape.RESPONSES, strip_usage=True)
    assert _run(tap, [stream]) == stream  # nothing is hidden outside the chat API
    assert (tap.usage.input_tokens, tap.usage.output_tokens, tap.usage.answer_id) == (8, 4, "r1")
    assert tap.chunks == 4


def test_anthropic_stream_usage_from_message_start_and_the_last_delta() -> None:
    stream = (
        _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 30, "output_tokens": 1}},
            },
        )
        + _sse("content_block_delta", {"type": "content_block_delta", "delta": {"text": "a"}})
        + _sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2}})
        + _sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 12}})
        + _sse("message_stop", {"type": "message_stop"})
    )
    tap = UsageTap(AnswerShape.ANTHROPIC, strip_usage=False)
    _run(tap, [stream[:50], stream[50:]])
    assert (tap.prompt_tokens, tap.completion_tokens) == (30, 12)


def test_ollama_ndjson_lines() -> None:
    lines = [json.dumps({"model": "served", "done": False}).encode() + b"\n" for _ in range(3)]
    last = json.dumps(
        {"model": "served", "done": True, "prompt_eval_count": 5, "eval_count": 3}
    ).encode()
    tap = UsageTap(
        AnswerShape.OLLAMA,
        strip_usage=False,
        ndjson=True,
        rename=lambda data: data.replace(b'"served"', b'"public"'),
    )
    out = _run(tap, [*lines, last[:10], last[10:] + b"\n"])
    assert out == b"".join([*lines, last + b"\n"]).replace(b'"served"', b'"public"')
    assert (tap.prompt_tokens, tap.completion_tokens, tap.chunks) == (5, 3, 3)


def test_llamacpp_and_generate_streams() -> None:
    llama = _event({"content": "a", "stop": False}) + _event(
        {"content": "", "stop": True, "timings": {"prompt_n": 6, "predicted_n": 1}}
    )
    tap = UsageTap(AnswerShape.LLAMACPP, strip_usage=False)
    _run(tap, [llama])
    assert (tap.prompt_tokens, tap.completion_tokens) == (6, 1)
    tgi = _event({"token": {"id": 1, "text": "a"}, "details": None}) + _event(
        {"token": {"id": 2, "text": "b"}, "details": {"generated_tokens": 2}}
    )
    tap = UsageTap(AnswerShape.GENERATE, strip_usage=False)
    _run(tap, [tgi])
    assert (tap.prompt_tokens, tap.completion_tokens, tap.chunks) == (None, 2, 2)
