"""The usage parser: the top-level ``usage`` of a whole JSON answer, and the last usage object
in the end of a body too long to keep, found by matching braces outside strings."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy.usage import Usage, usage_in_tail, usage_of_json

ANSWER = (
    b'{"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": '
    b'{"role": "assistant", "content": "hi"}}], '
    b'"usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}'
)


# -- usage_of_json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (ANSWER, Usage(prompt_tokens=7, completion_tokens=5)),
        # embeddings report no completion tokens
        (b'{"data": [], "usage": {"prompt_tokens": 777}}', Usage(prompt_tokens=777)),
        # details the struct does not name are skipped, nested objects included
        (
            b'{"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}, '
            b'"completion_tokens": 4}}',
            Usage(prompt_tokens=3, completion_tokens=4),
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
        (b'{"usage": {"prompt_tokens": "7"}}', None),
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
        "count-a-string",
    ],
)
def test_usage_of_json(body: bytes, usage: Usage | None) -> None:
    assert usage_of_json(body) == usage


# -- usage_in_tail ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "usage"),
    [
        (ANSWER, Usage(prompt_tokens=7, completion_tokens=5)),
        # the last bytes of a long body: its start (and the top-level brace) is gone
        (ANSWER[ANSWER.index(b"}}]") :], Usage(prompt_tokens=7, completion_tokens=5)),
        (
            b'"usage": {"completion_tokens": 2, "prompt_tokens": 1}}',
            Usage(prompt_tokens=1, completion_tokens=2),
        ),
        # whitespace a pretty-printing server puts around the colon
        (b'"usage" :\n  {\n "prompt_tokens": 1\n}\n}', Usage(prompt_tokens=1)),
        # braces and quotes inside strings do not end the object early
        (
            b'"usage": {"note": "a } b \\" } { c", "prompt_tokens": 1, "completion_tokens": 2}}',
            Usage(prompt_tokens=1, completion_tokens=2),
        ),
        # an escaped backslash ends a string with a quote that is not escaped
        (
            b'"usage": {"note": "ends in \\\\", "prompt_tokens": 1, "completion_tokens": 2}}',
            Usage(prompt_tokens=1, completion_tokens=2),
        ),
        (
            b'"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": {"a": 1}},'
            b' "completion_tokens": 4}}',
            Usage(prompt_tokens=3, completion_tokens=4),
        ),
        # several usage objects (a body of many results): the last one wins
        (
            b'{"a": {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}, '
            b'"usage": {"prompt_tokens": 2, "completion_tokens": 9}}',
            Usage(prompt_tokens=2, completion_tokens=9),
        ),
        (
            b'{"usage": {"prompt_tokens": 1}, "b": {"usage": {"prompt_tokens": 5}}}',
            Usage(prompt_tokens=5),
        ),
        # a key inside a string is no key; the string's quotes are escaped
        (
            b'{"usage": {"prompt_tokens": 1}, "c": "say \\"usage\\": {\\"prompt_tokens\\": 9}"}',
            Usage(prompt_tokens=1),
        ),
        (b'{"id": "c", "choices": []}', None),
        (b"", None),
        (b'"usage"', None),
        (b'"usage": null}', None),
        # the tail was cut inside the object: the usage is not whole
        (b'"usage": {"prompt_tokens": 7, "completion_tokens": 5', None),
        (b'"usage": {"prompt_tokens": 7, "note": "}", "completion', None),
        (b'"usage": {"prompt_tokens": 7, "details": {"a": 1}', None),
        (b'"usage": {"prompt_tokens": "7"}}', None),  # whole, but not a usage
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
        "not-a-usage",
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
    assert usage_in_tail(tail) == Usage(prompt_tokens=7, completion_tokens=5)


# -- properties ------------------------------------------------------------------------------------

_counts = st.integers(min_value=0, max_value=2**40)
_usages = st.builds(Usage, prompt_tokens=_counts, completion_tokens=_counts)
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
    body = msgspec.json.encode({**fields, "usage": usage})
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
    body = msgspec.json.encode({**fields, "usage": usage, "after": after})
    assert usage_in_tail(body) == usage
