"""Request-body parsing: every prompt form, clear 400 messages, and the include_usage rewrite."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy.apis import routes
from gateway.proxy.apis.common import BadRequestBody, Endpoint
from gateway.proxy.apis.openai import with_usage_requested
from gateway.proxy.apis.routes import parse_request

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


def test_endpoints_are_recognised_by_path() -> None:
    assert (
        routes.route("POST", "/v1/chat/completions").parse
        is routes.route("POST", "/chat/completions/").parse
    )
    assert routes.route("POST", "/v1/models").parse is None
    assert routes.route("GET", "/v1/chat/completions").unknown
    with pytest.raises(BadRequestBody, match="not an endpoint this gateway can cost"):
        parse_request(b"{}", "/v1/models")


def test_chat_request_fields() -> None:
    body = msgspec.json.encode(
        {
            "model": "llama",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}],
                },
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 32,
            "n": 2,
            "temperature": 0.5,
            "logit_bias": {"50256": -100},
        }
    )
    parsed = parse_request(body, CHAT)
    assert parsed.model == "llama"
    assert parsed.endpoint is Endpoint.CHAT
    assert parsed.stream
    assert parsed.include_usage
    assert parsed.texts == ("be brief", "hi", "ann", "f", "{}")
    assert parsed.char_counts == (8, 5, 3)
    assert parsed.messages == 3
    assert parsed.media == 0
    assert parsed.max_tokens == 32
    assert parsed.n == 2
    assert not parsed.embedding


@pytest.mark.parametrize(("sent", "read"), [(16, 16), (16.0, 16), ("16", 16)])
def test_numbers_are_read_as_the_backends_pydantic_models_read_them(
    sent: object, read: int
) -> None:
    body = msgspec.json.encode({"model": "m", "messages": [], "max_tokens": sent, "n": sent})
    parsed = parse_request(body, CHAT)
    assert (parsed.max_tokens, parsed.n) == (read, read)


def test_a_fractional_token_count_is_refused() -> None:
    with pytest.raises(BadRequestBody) as info:
        parse_request(b'{"model": "m", "messages": [], "max_tokens": 16.5}', CHAT)
    assert info.value.param == "max_tokens"


def test_include_usage_needs_a_stream() -> None:
    body = b'{"model":"m","messages":[],"stream_options":{"include_usage":true}}'
    assert not parse_request(body, CHAT).include_usage
    streamed = b'{"model":"m","messages":[],"stream":true}'
    parsed = parse_request(streamed, CHAT)
    assert parsed.stream
    assert not parsed.include_usage


@pytest.mark.parametrize(
    ("prompt", "texts", "token_ids", "prompts"),
    [
        ("abc", ("abc",), 0, 1),
        (["abc", "de"], ("abc", "de"), 0, 2),
        ([1, 2, 3], (), 3, 1),
        ([[1, 2], [3]], (), 3, 2),
    ],
)
def test_the_four_prompt_forms(
    prompt: object, texts: tuple[str, ...], token_ids: int, prompts: int
) -> None:
    body = msgspec.json.encode({"model": "m", "prompt": prompt, "max_tokens": 5})
    parsed = parse_request(body, COMPLETIONS)
    assert parsed.texts == texts
    assert parsed.char_counts == tuple(map(len, texts))
    assert parsed.token_ids == token_ids
    assert parsed.prompts == prompts
    assert parsed.max_tokens == 5
    embedded = parse_request(msgspec.json.encode({"model": "m", "input": prompt}), EMBEDDINGS)
    assert (embedded.texts, embedded.token_ids, embedded.prompts) == (texts, token_ids, prompts)
    assert embedded.embedding
    assert embedded.max_tokens is None


@pytest.mark.parametrize(
    ("body", "path", "message", "param"),
    [
        (b'{"model": "m", "messages": [', CHAT, "not valid JSON", None),
        (b'{"model": "m", "messages": []} x', CHAT, "trailing characters (byte 32)", None),
        (b"[]", CHAT, "Expected `object`, got `array`", None),
        (b'{"messages": []}', CHAT, "missing required field `model`", "model"),
        (b'{"model": " ", "messages": []}', CHAT, "`model` must name a model", "model"),
        (b'{"model": 3, "messages": []}', CHAT, "Expected `str`, got `int`", "model"),
        (b'{"model": "m"}', CHAT, "missing required field `messages`", "messages"),
        (b'{"model": "m", "messages": [{"content": 1}]}', CHAT, "got `int`", "messages[0].content"),
        (
            b'{"model": "m", "messages": [], "stream": "yes"}',
            CHAT,
            "Expected `bool | null`, got `str`",
            "stream",
        ),
        (b'{"model": "m", "messages": [], "n": 0}', CHAT, "Expected `int` >= 1", "n"),
        (b'{"model": "m", "messages": [], "max_tokens": -1}', CHAT, ">= 0", "max_tokens"),
        (b'{"model": "m", "prompt": []}', COMPLETIONS, "must not be empty", "prompt"),
        (b'{"model": "m", "prompt": 7}', COMPLETIONS, "must be a string", "prompt"),
        (b'{"model": "m", "prompt": [1, "a"]}', COMPLETIONS, "at `$.prompt[1]`", "prompt[1]"),
        (b'{"model": "m", "input": [[1], ["a"]]}', EMBEDDINGS, "got `str`", "input[1][0]"),
        (b'{"model": "m", "input": ""}', EMBEDDINGS, "must not be empty", "input"),
        (b'{"model": "m"}', EMBEDDINGS, "missing required field `input`", "input"),
    ],
)
def test_bad_bodies_get_a_clear_message(
    body: bytes, path: str, message: str, param: str | None
) -> None:
    with pytest.raises(BadRequestBody) as info:
        parse_request(body, path)
    assert message in info.value.message
    assert info.value.param == param


def test_with_usage_requested_adds_the_flag_and_keeps_the_rest() -> None:
    body = (
        b'{"model": "m", "temperature": 0.70, "stream": true,'
        b' "messages": [{"role": "user", "content": "\\u00e9"}]}'
    )
    rewritten = with_usage_requested(body)
    assert b'"temperature":0.70' in rewritten  # raw values are copied, not re-encoded
    assert b'"content": "\\u00e9"' in rewritten
    decoded = msgspec.json.decode(rewritten)
    assert decoded["stream_options"] == {"include_usage": True}
    assert parse_request(rewritten, CHAT).include_usage


def test_with_usage_requested_keeps_other_stream_options() -> None:
    body = (
        b'{"model": "m", "stream": true,'
        b' "stream_options": {"continuous_usage_stats": true, "include_usage": false}}'
    )
    decoded = msgspec.json.decode(with_usage_requested(body))
    assert decoded["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    nulled = msgspec.json.decode(with_usage_requested(b'{"model": "m", "stream_options": null}'))
    assert nulled["stream_options"] == {"include_usage": True}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k != "stream_options"), json_values, max_size=6
    )
)
def test_with_usage_requested_preserves_every_other_field(fields: dict[str, object]) -> None:
    body = msgspec.json.encode(fields)
    decoded = msgspec.json.decode(with_usage_requested(body))
    assert decoded.pop("stream_options") == {"include_usage": True}
    assert decoded == msgspec.json.decode(body)
