"""Usage as each API reports it, whole answers and stream events, and what is not trusted."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.cost import ModelProfile, sane_usage
from gateway.proxy.usage import AnswerShape, Usage, usage_in_tail, usage_of_event, usage_of_json


def _j(payload: object) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("shape", "answer", "expected"),
    [
        (AnswerShape.OPENAI, {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}, (7, 3)),
        (
            AnswerShape.RESPONSES,
            {"id": "resp_9", "usage": {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}},
            (11, 4),
        ),
        (
            AnswerShape.ANTHROPIC,
            {
                "type": "message",
                "usage": {
                    "input_tokens": 10,
                    "cache_read_input_tokens": 5,
                    "cache_creation_input_tokens": 2,
                    "output_tokens": 6,
                },
            },
            (17, 6),
        ),
        (AnswerShape.OLLAMA, {"done": True, "prompt_eval_count": 26, "eval_count": 290}, (26, 290)),
        (AnswerShape.LLAMACPP, {"tokens_evaluated": 12, "tokens_predicted": 8}, (12, 8)),
        (AnswerShape.LLAMACPP, {"timings": {"prompt_n": 9, "predicted_n": 2}}, (9, 2)),
        (AnswerShape.GENERATE, {"details": {"generated_tokens": 5}}, (None, 5)),
        (
            AnswerShape.GENERATE,
            {"text": "x", "meta_info": {"prompt_tokens": 4, "completion_tokens": 6}},
            (4, 6),
        ),
        (AnswerShape.OPENAI, {"results": [], "usage": {"total_tokens": 30}}, (30, None)),
    ],
)
def test_whole_answers(shape: AnswerShape, answer: object, expected: tuple[int, int]) -> None:
    usage = usage_of_json(shape, _j(answer))
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == expected


def test_a_batch_of_sglang_answers_is_summed() -> None:
    batch = [{"meta_info": {"prompt_tokens": 2, "completion_tokens": 3}}] * 2
    assert usage_of_json(AnswerShape.GENERATE, _j(batch)) == Usage(4, 6)


def test_the_responses_id_is_kept() -> None:
    usage = usage_of_json(AnswerShape.RESPONSES, _j({"id": "resp_1", "usage": {"input_tokens": 1}}))
    assert usage is not None
    assert usage.answer_id == "resp_1"


def test_negative_counts_are_not_trusted() -> None:
    usage = usage_of_json(
        AnswerShape.OPENAI, _j({"usage": {"prompt_tokens": -5000, "completion_tokens": 3}})
    )
    assert usage == Usage(None, 3)
    assert (
        usage_of_json(AnswerShape.OLLAMA, _j({"prompt_eval_count": -1, "eval_count": -1})) is None
    )


def test_bad_answers_give_none() -> None:
    for shape in AnswerShape:
        assert usage_of_json(shape, b"not json") is None
        assert usage_of_json(shape, b"[" * 5000) is None


def test_an_absurd_count_is_bounded_when_settled() -> None:
    huge = b'{"usage": {"prompt_tokens": 1' + b"0" * 400 + b"}}"
    usage = usage_of_json(AnswerShape.OPENAI, huge)
    assert usage is not None
    assert usage.input_tokens is not None
    assert sane_usage(PROFILE, 1, usage.input_tokens, 0) == (PROFILE.context_tokens, 0)


def test_stream_events() -> None:
    created = _j({"type": "response.created", "response": {"id": "resp_2", "usage": None}})
    assert usage_of_event(AnswerShape.RESPONSES, created) == Usage(None, None, "resp_2")
    completed = _j(
        {
            "type": "response.completed",
            "response": {"id": "resp_2", "usage": {"input_tokens": 20, "output_tokens": 9}},
        }
    )
    assert usage_of_event(AnswerShape.RESPONSES, completed) == Usage(20, 9, "resp_2")
    start = _j(
        {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}}
    )
    delta = _j({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}})
    merged = usage_of_event(AnswerShape.ANTHROPIC, start)
    later = usage_of_event(AnswerShape.ANTHROPIC, delta)
    assert merged is not None
    assert later is not None
    assert merged.merged(later) == Usage(25, 15)


def test_long_answers_are_read_from_their_tail() -> None:
    tail = b'...": "x"}], "usage": {"input_tokens": 3, "output_tokens": 2}, "user": null}'
    assert usage_in_tail(AnswerShape.RESPONSES, tail) == Usage(3, 2)
    ndjson = b'{"done":false}\n{"done":true,"prompt_eval_count":4,"eval_count":5}\n'
    assert usage_in_tail(AnswerShape.OLLAMA, ndjson) == Usage(4, 5)
    assert usage_in_tail(AnswerShape.OLLAMA, b'{"done":true,"prompt_eval_co') is None


PROFILE = ModelProfile(
    layers=2,
    kv_heads=2,
    head_dim=8,
    dtype_bytes=2.0,
    block_size=16,
    context_tokens=4096,
    default_max_tokens=64,
    chars_per_token=4.0,
    prefill_tokens_per_s=1000.0,
    decode_tokens_per_s=10.0,
    price_input_per_mtok=0.0,
    price_output_per_mtok=0.0,
)


@given(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.integers(min_value=1, max_value=16),
)
def test_settled_usage_is_never_negative_nor_beyond_a_context_per_sequence(
    input_tokens: int, output_tokens: int, sequences: int
) -> None:
    got_in, got_out = sane_usage(PROFILE, sequences, input_tokens, output_tokens)
    most = PROFILE.context_tokens * sequences
    assert 0 <= got_in <= most
    assert 0 <= got_out <= most
    if 0 <= input_tokens <= most:
        assert got_in == input_tokens
    if 0 <= output_tokens <= most:
        assert got_out == output_tokens
