"""Every API's parser produces the prompt shape the cost rules read: a test per shape, the
routing table, and the alias rewrites."""

from __future__ import annotations

import json

import pytest

from gateway.core.cost import ModelProfile, estimate
from gateway.core.history import ResponseMemory
from gateway.proxy.apis import routes
from gateway.proxy.apis.common import BadRequestBody, Endpoint, ParsedRequest
from gateway.proxy.responses import ErrorShape
from gateway.proxy.usage import AnswerShape

PROFILE = ModelProfile(
    layers=32,
    kv_heads=8,
    head_dim=128,
    dtype_bytes=2.0,
    block_size=16,
    context_tokens=8192,
    default_max_tokens=256,
    chars_per_token=4.0,
    prefill_tokens_per_s=8000.0,
    decode_tokens_per_s=40.0,
    price_input_per_mtok=0.0,
    price_output_per_mtok=0.0,
)


def parse(path: str, body: object, content_type: str = "application/json") -> ParsedRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return routes.parse_request(raw, path, content_type)


def test_responses_reads_instructions_every_item_and_tools() -> None:
    parsed = parse(
        "/v1/responses",
        {
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": "hello there"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is"},
                        {"type": "input_image", "image_url": "data:..."},
                    ],
                },
                {"type": "function_call", "name": "lookup", "arguments": '{"q":1}'},
                {"type": "function_call_output", "call_id": "c", "output": "42"},
            ],
            "tools": [{"type": "function", "name": "lookup"}],
            "max_output_tokens": 50,
            "stream": True,
            "previous_response_id": "resp_1",
        },
    )
    assert parsed.endpoint is Endpoint.RESPONSES
    assert parsed.texts[:6] == ("be brief", "hello there", "what is", "lookup", '{"q":1}', "42")
    assert "lookup" in parsed.texts[-1]  # the tools' JSON
    assert parsed.messages == 5  # instructions + four items
    assert parsed.media == 1
    assert parsed.char_counts[:5] == (8, 11, 7, 13, 2)
    assert (parsed.max_tokens, parsed.stream, parsed.previous_response_id) == (50, True, "resp_1")


def test_responses_input_may_be_one_string_and_output_defaults() -> None:
    parsed = parse("/v1/responses", {"model": "m", "input": "x" * 40})
    assert (parsed.texts, parsed.messages, parsed.max_tokens) == (("x" * 40,), 1, None)
    assert estimate(parsed, PROFILE).output_tokens == PROFILE.default_max_tokens


def test_messages_reads_system_blocks_tool_use_and_results() -> None:
    parsed = parse(
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "sys"}],
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm"},
                        {"type": "tool_use", "id": "t", "name": "calc", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "text", "text": "2"}],
                        },
                        {"type": "image", "source": {"type": "base64", "data": "..."}},
                    ],
                },
            ],
            "tools": [{"name": "calc", "input_schema": {}}],
        },
    )
    assert parsed.endpoint is Endpoint.MESSAGES
    assert parsed.texts[:6] == ("sys", "hi", "hmm", "calc", '{"a": 1}', "2")
    assert (parsed.messages, parsed.media, parsed.max_tokens) == (4, 1, 100)


def test_messages_requires_max_tokens() -> None:
    with pytest.raises(BadRequestBody) as caught:
        parse("/v1/messages", {"model": "m", "messages": []})
    assert caught.value.param == "max_tokens"


def test_ollama_chat_streams_by_default_and_reads_num_predict() -> None:
    parsed = parse(
        "/api/chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "abcd", "images": ["..."]}],
            "options": {"num_predict": 30},
        },
    )
    assert (parsed.endpoint, parsed.stream, parsed.max_tokens) == (Endpoint.OLLAMA_CHAT, True, 30)
    assert (parsed.texts, parsed.messages, parsed.media) == (("abcd",), 1, 1)


def test_ollama_generate_infinite_num_predict_reserves_the_default() -> None:
    parsed = parse(
        "/api/generate",
        {
            "model": "m",
            "prompt": "p" * 8,
            "system": "s",
            "stream": False,
            "options": {"num_predict": -1},
        },
    )
    assert (parsed.texts, parsed.stream, parsed.max_tokens) == (("s", "p" * 8), False, None)


def test_ollama_embed_counts_each_input() -> None:
    parsed = parse("/api/embed", {"model": "m", "input": ["aa", "bbbb"]})
    assert (parsed.prompts, parsed.char_counts, parsed.embedding) == (2, (2, 4), True)
    assert estimate(parsed, PROFILE).output_tokens == 0


def test_llamacpp_completion_infill_and_embedding() -> None:
    parsed = parse("/completion", {"prompt": "hello", "n_predict": 12, "stream": True})
    assert (parsed.model, parsed.texts, parsed.max_tokens, parsed.stream) == (
        "",
        ("hello",),
        12,
        True,
    )
    ids = parse("/completion", {"prompt": [1, 2, 3]})
    assert ids.token_ids == 3
    infill = parse("/infill", {"input_prefix": "def f(", "input_suffix": ")", "n_predict": 5})
    assert infill.texts == ("def f(", ")")
    embedding = parse("/embedding", {"content": "abc"})
    assert (embedding.texts, embedding.embedding) == (("abc",), True)


def test_tgi_and_sglang_generate() -> None:
    tgi = parse("/generate", {"inputs": "abc", "parameters": {"max_new_tokens": 20, "best_of": 2}})
    assert (tgi.texts, tgi.max_tokens, tgi.n, tgi.stream) == (("abc",), 20, 2, False)
    assert parse("/generate_stream", {"inputs": "abc"}).stream
    sglang = parse(
        "/generate",
        {"text": ["a", "bb"], "sampling_params": {"max_new_tokens": 8}, "stream": True},
    )
    assert (sglang.prompts, sglang.max_tokens, sglang.stream) == (2, 8, True)
    ids = parse("/generate", {"input_ids": [[1, 2], [3]]})
    assert (ids.token_ids, ids.prompts) == (3, 2)


def test_rerank_reads_the_query_with_each_document() -> None:
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        parsed = parse(path, {"model": "m", "query": "q", "documents": ["aa", {"text": "bbb"}]})
        assert (parsed.texts, parsed.char_counts, parsed.prompts) == (
            ("q", "aa", "q", "bbb"),
            (3, 4),
            2,
        )
        assert parsed.embedding


def test_score_pairs_and_pooling_input() -> None:
    score = parse("/v1/score", {"model": "m", "text_1": "q", "text_2": ["a", "b", "c"]})
    assert (score.prompts, score.char_counts) == (3, (2, 2, 2))
    pooled = parse("/pooling", {"model": "m", "input": ["abc", "de"]})
    assert (pooled.prompts, pooled.char_counts, pooled.embedding) == (2, (3, 2), True)
    classify = parse("/classify", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert classify.texts == ("x",)


def test_audio_multipart_counts_the_file_and_reads_the_fields() -> None:
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nnames\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--{boundary}--\r\n"
    ).encode()
    parsed = parse("/v1/audio/transcriptions", body, f"multipart/form-data; boundary={boundary}")
    assert (parsed.model, parsed.texts, parsed.media) == ("whisper", ("names",), 1)
    assert estimate(parsed, PROFILE).input_tokens == 2 + PROFILE.image_tokens


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "m", "input": "x" * 400}),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 400}]},
        ),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}),
        ("/api/generate", {"model": "m", "prompt": "x" * 400}),
        ("/completion", {"prompt": "x" * 400}),
        ("/generate", {"inputs": "x" * 400}),
        ("/v1/rerank", {"model": "m", "query": "q", "documents": ["x" * 400]}),
    ],
)
def test_every_costed_endpoint_reserves_tokens_and_kv(path: str, body: object) -> None:
    cost = estimate(parse(path, body), PROFILE)
    assert cost.input_tokens >= 100
    assert cost.kv_bytes >= 100 * PROFILE.kv_bytes_per_token


def test_the_routing_table() -> None:
    assert routes.route("POST", "/v1/messages").errors is ErrorShape.ANTHROPIC
    assert routes.route("POST", "/v1/messages").answers is AnswerShape.ANTHROPIC
    assert routes.route("POST", "/v1/messages/count_tokens").parse is None
    assert routes.route("POST", "/v1/messages/count_tokens").errors is ErrorShape.ANTHROPIC
    assert not routes.route("POST", "/v1/messages/count_tokens").unknown
    assert routes.route("POST", "/api/chat").answers is AnswerShape.OLLAMA
    assert routes.route("POST", "/openai/v1/responses").answers is AnswerShape.RESPONSES
    assert routes.route("POST", "/tokenize").parse is None
    assert not routes.route("POST", "/tokenize").unknown
    assert routes.route("POST", "/v1/some/new/thing").unknown
    assert routes.route("POST", "/v1/chat/completions").asks_usage
    assert not routes.route("POST", "/v1/responses").asks_usage


# Checks: `allowed` lets an exact costed POST path through before its backend-admin check, so
# none of those paths may be an admin path; the admin paths stay refused.
def test_no_costed_path_is_a_backend_admin_path() -> None:
    for path in routes._POST:
        assert not routes.admin_path(path), path
        assert routes.allowed("POST", path)
        assert routes.allowed("POST", path + "/")
    for path in (
        "/sleep",
        "/v1/load_lora_adapter",
        "/admin/completions",
        "/admin/chat/completions",
    ):
        assert not routes.allowed("POST", path, ("/*",))


def test_unknown_bodies_are_estimated_from_their_length() -> None:
    parsed = routes.estimated(b"x" * 400, "m")
    cost = estimate(parsed, PROFILE)
    assert (cost.input_tokens, cost.output_tokens) == (100, PROFILE.default_max_tokens)


def test_alias_rewrites() -> None:
    body = b'{"model": "public", "messages": [{"content": "model"}], "n": 1}'
    rewritten = json.loads(routes.with_model(body, "org/served-7b"))
    assert rewritten == {"model": "org/served-7b", "messages": [{"content": "model"}], "n": 1}
    assert routes.with_model(b'{"prompt": "x"}', "s") == b'{"prompt": "x"}'
    assert routes.with_model(b"not json", "s") == b"not json"
    rename = routes.renamer("org/served-7b", "public")
    answer = b'{"model":"org/served-7b","response":{"model" : "org/served-7b"},"x":"org/served-7b"}'
    assert (
        rename(answer) == b'{"model":"public","response":{"model" : "public"},"x":"org/served-7b"}'
    )


def test_response_memory_is_per_tenant_and_bounded() -> None:
    memory = ResponseMemory(per_tenant=2)
    memory.remember("a", "r1", 100)
    memory.remember("a", "r2", 200)
    assert memory.tokens_of("b", "r1") == 0  # another tenant's id gives nothing
    assert memory.tokens_of("a", "r1") == 100  # and is now the most recent
    memory.remember("a", "r3", 300)
    assert (memory.tokens_of("a", "r1"), memory.tokens_of("a", "r2")) == (100, 0)
