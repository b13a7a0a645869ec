"""The OpenAI-shaped usage block: the top-level ``usage`` of a whole JSON answer, and the last
usage object in the end of a body too long to keep, found by matching braces outside strings."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy.usage import AnswerShape, Usage
from gateway.proxy.usage import usage_in_tail as _usage_in_tail
from gateway.proxy.usage import usage_of_json as _usage_of_json


def _counts_of(usage: Usage | None) -> Usage | None:
    """The token counts alone (the answer's id is another test's subject)."""
    if usage is None or (usage.input_tokens is None and usage.output_tokens is None):
        return None
    return Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


def usage_of_json(body: bytes) -> Usage | None:
    return _counts_of(_usage_of_json(AnswerShape.OPENAI, body))


def usage_in_tail(tail: bytes) -> Usage | None:
    return _counts_of(_usage_in_tail(AnswerShape.OPENAI, tail))


def counts(prompt: int | None = None, completion: int | None = None) -> Usage:
    return Usage(input_tokens=prompt, output_tokens=completion)


ANSWER = (
    b'{"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": '
    b'{"role": "assistant", "content": "hi"}}], '
    b'"usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}'
)


# -- usage_of_json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (ANSWER, counts(7, 5)),
        # embeddings report no completion tokens
        (b'{"data": [], "usage": {"prompt_tokens": 777}}', counts(777)),
        # details the struct does not name are skipped, nested objects included
        (
            b'{"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}, '
            b'"completion_tokens": 4}}',
            counts(3, 4),
        ),
        (b'{"id": "c", "choices": []}', None),
        (b'{"usage": null}', None),
        # only the top level counts: a usage inside a choice is the backend's content
        (b'{"choices": [{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}]}', None),
        (b'{"usage": {"prompt_tokens": 7, "completion_tokens": 5}', None),  # cut short
        (b"not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"usage": "seven"}', None),
        # a count written as a string is read as a number, as the backends' pydantic does
        (b'{"usage": {"prompt_tokens": "7"}}', counts(7)),
    ],
    ids=[
        "chat",
        "embeddings",
        "nested-details",
        "no-usage",
        "null",
        "nested-not-top-level",
        "cut",
        "not-json",
        "empty",
        "array",
        "usage-a-string",
        "count-a-string-read-as-a-number",
    ],
)
def test_usage_of_json(body: bytes, usage: Usage | None) -> None:
    assert usage_of_json(body) == usage


# -- usage_in_tail ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "usage"),
    [
        (ANSWER, counts(7, 5)),
        # the last bytes of a long body: its start (and the top-level brace) is gone
        (ANSWER[ANSWER.index(b"}}]") :], counts(7, 5)),
        (
            b'"usage": {"completion_tokens": 2, "prompt_tokens": 1}}',
            counts(1, 2),
        ),
        # whitespace a pretty-printing server puts around the colon
        (b'"usage" :\n  {\n "prompt_tokens": 1\n}\n}', counts(1)),
        # braces and quotes inside strings do not end the object early
        (
            b'"usage": {"note": "a } b \\" } { c", "prompt_tokens": 1, "completion_tokens": 2}}',
            counts(1, 2),
        ),
        # an escaped backslash ends a string with a quote that is not escaped
        (
            b'"usage": {"note": "ends in \\\\", "prompt_tokens": 1, "completion_tokens": 2}}',
            counts(1, 2),
        ),
        (
            b'"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": {"a": 1}},'
            b' "completion_tokens": 4}}',
            counts(3, 4),
        ),
        # several usage objects (a body of many results): the last one wins
        (
            b'{"a": {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}, '
            b'"usage": {"prompt_tokens": 2, "completion_tokens": 9}}',
            counts(2, 9),
        ),
        (
            b'{"usage": {"prompt_tokens": 1}, "b": {"usage": {"prompt_tokens": 5}}}',
            counts(5),
        ),
        # a key inside a string is no key; the string's quotes are escaped
        (
            b'{"usage": {"prompt_tokens": 1}, "c": "say \\"usage\\": {\\"prompt_tokens\\": 9}"}',
            counts(1),
        ),
        (b'{"id": "c", "choices": []}', None),
        (b"", None),
        (b'"usage"', None),
        (b'"usage": null}', None),
        # the tail was cut inside the object: the usage is not whole
        (b'"usage": {"prompt_tokens": 7, "completion_tokens": 5', None),
        (b'"usage": {"prompt_tokens": 7, "note": "}", "completion', None),
        (b'"usage": {"prompt_tokens": 7, "details": {"a": 1}', None),
        (b'"usage": {"prompt_tokens": "7"}}', counts(7)),  # a count written as a string
    ],
    ids=[
        "whole-answer",
        "last-bytes",
        "key-first",
        "whitespace",
        "braces-and-quotes-in-strings",
        "escaped-backslash",
        "nested-objects",
        "last-of-two",
        "last-is-nested",
        "key-inside-a-string",
        "no-usage",
        "empty",
        "key-only",
        "null",
        "cut-inside",
        "cut-after-a-brace-in-a-string",
        "cut-after-a-nested-object",
        "count-a-string",
    ],
)
def test_usage_in_tail(tail: bytes, usage: Usage | None) -> None:
    assert usage_in_tail(tail) == usage


def test_a_string_valued_usage_after_the_usage_object_is_not_taken_for_the_key() -> None:
    # vLLM puts ``prompt_logprobs`` after ``usage``; each token carries its text, and a prompt's
    # token can be the word itself
    tail = (
        b'"usage": {"prompt_tokens": 7, "completion_tokens": 5}, "prompt_logprobs": [null, '
        b'{"8478": {"logprob": -1.5, "rank": 1, "decoded_token": "usage"}}, '
        b'{"25": {"logprob": -0.5, "rank": 1, "decoded_token": ":"}}]}'
    )
    assert usage_in_tail(tail) == counts(7, 5)


# -- properties ------------------------------------------------------------------------------------

_counts = st.integers(min_value=0, max_value=2**40)
_usages = st.builds(counts, _counts, _counts)
_values = st.recursive(
    st.text() | st.integers() | st.none(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
_fields = st.dictionaries(st.text().filter(lambda key: key != "usage"), _values, max_size=5)


@given(fields=_fields, usage=_usages)
def test_the_usage_ending_an_encoded_body_is_found_and_every_cut_gives_it_or_none(
    fields: dict[str, object], usage: Usage
) -> None:
    block = {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens}
    body = msgspec.json.encode({**fields, "usage": block})
    assert usage_of_json(body) == usage
    assert usage_in_tail(body) == usage
    for cut in range(len(body)):
        assert usage_in_tail(body[cut:]) in (None, usage)
    # a body cut before the usage object's end has no usage yet; only the outer brace may go
    for cut in range(len(body) - 1):
        assert usage_in_tail(body[:cut]) is None
    assert usage_in_tail(body[:-1]) == usage


_strings = st.text() | st.sampled_from(["usage", '"usage": {}', "usage: {"])
_after = st.dictionaries(
    _strings, st.recursive(_strings, lambda inner: st.lists(inner, max_size=3)), max_size=3
)


@given(fields=_fields, usage=_usages, after=_after)
def test_string_values_after_the_usage_never_change_what_is_found(
    fields: dict[str, object], usage: Usage, after: dict[str, object]
) -> None:
    # the usage is not the last key: strings of any content follow it, the word itself too
    block = {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens}
    body = msgspec.json.encode({**fields, "usage": block, "after": after})
    assert usage_in_tail(body) == usage
