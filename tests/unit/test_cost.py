"""Request cost: prompt-token rule, output reservation, KV bytes, GiB-seconds, price, settlement."""

from __future__ import annotations

import math
import sys

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.cost import (
    DTYPE_BYTES,
    GIB,
    ContextOverflowError,
    Cost,
    Holding,
    ModelProfile,
    actual_cost,
    estimate,
    prompt_tokens,
    settlement,
)
from gateway.core.tokens import TokenizerUnavailable, tiktoken_counter, tokenizer_json_counter
from gateway.core.types import Unit
from gateway.proxy.apis.routes import parse_request

LLAMA_8B = ModelProfile(
    layers=32,
    kv_heads=8,
    head_dim=128,
    dtype_bytes=DTYPE_BYTES["bf16"],
    block_size=16,
    context_tokens=8192,
    default_max_tokens=1024,
    chars_per_token=4.0,
    prefill_tokens_per_s=8000.0,
    decode_tokens_per_s=40.0,
    price_input_per_mtok=0.10,
    price_output_per_mtok=0.20,
)
KIB128 = 128 * 1024


def chat(*contents: str, **fields: object) -> bytes:
    body: dict[str, object] = {
        "model": "m",
        "messages": [{"role": "user", "content": c} for c in contents],
    }
    body.update(fields)
    return msgspec.json.encode(body)


def test_llama_8b_holds_128_kib_of_kv_per_token() -> None:
    assert LLAMA_8B.kv_bytes_per_token == KIB128


def test_chat_prompt_rule_counts_each_message() -> None:
    # 9 chars -> 3 tokens, 4 chars -> 1 token; + 4 per message + 3 priming
    parsed = parse_request(chat("x" * 9, "abcd"), "/v1/chat/completions")
    assert prompt_tokens(parsed, LLAMA_8B, None) == 3 + 1 + 2 * 4 + 3


def test_completion_prompt_has_no_chat_overhead_and_ids_count_exactly() -> None:
    text = parse_request(b'{"model":"m","prompt":"abcdefgh"}', "/v1/completions")
    assert prompt_tokens(text, LLAMA_8B, None) == 2
    ids = parse_request(b'{"model":"m","prompt":[5,6,7]}', "/v1/completions")
    assert prompt_tokens(ids, LLAMA_8B, None) == 3


def test_image_parts_cost_a_fixed_amount() -> None:
    body = (
        b'{"model":"m","messages":[{"role":"user","content":['
        b'{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"data:..."}}]}]}'
    )
    parsed = parse_request(body, "/v1/chat/completions")
    assert prompt_tokens(parsed, LLAMA_8B, None) == 1 + 4 + 3 + LLAMA_8B.image_tokens


def test_tool_definitions_are_part_of_the_prompt() -> None:
    plain = parse_request(chat("hi"), "/v1/chat/completions")
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 400}}]
    with_tools = parse_request(chat("hi", tools=tools), "/v1/chat/completions")
    assert prompt_tokens(with_tools, LLAMA_8B, None) > prompt_tokens(plain, LLAMA_8B, None) + 100


def test_estimate_of_a_chat_request_by_hand() -> None:
    parsed = parse_request(chat("x" * 400, max_tokens=100), "/v1/chat/completions")
    cost = estimate(parsed, LLAMA_8B)
    prompt = 100 + 4 + 3
    assert cost.input_tokens == prompt
    assert cost.output_tokens == 100
    blocks = math.ceil((prompt + 100) / 16)
    assert cost.kv_bytes == blocks * 16 * KIB128
    duration_s = prompt / 8000 + 100 / 40
    assert cost.kv_gib_seconds == pytest.approx(cost.kv_bytes / GIB * duration_s)
    assert cost.price == pytest.approx((prompt * 0.10 + 100 * 0.20) / 1e6)
    assert cost.requests == 1.0
    assert cost.amount(Unit.TOKENS) == prompt + 100


def test_default_output_is_capped_by_the_context() -> None:
    parsed = parse_request(chat("x" * 4 * 7800), "/v1/chat/completions")
    cost = estimate(parsed, LLAMA_8B)
    assert cost.input_tokens == 7800 + 7
    assert cost.output_tokens == 8192 - 7807
    roomy = estimate(parse_request(chat("hello"), "/v1/chat/completions"), LLAMA_8B)
    assert roomy.output_tokens == LLAMA_8B.default_max_tokens


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body = chat("hi", max_tokens=500, max_completion_tokens=50)
    assert estimate(parse_request(body, "/v1/chat/completions"), LLAMA_8B).output_tokens == 50


def test_a_request_that_cannot_fit_the_context_is_refused() -> None:
    parsed = parse_request(chat("x" * 4 * 8000, max_tokens=500), "/v1/chat/completions")
    with pytest.raises(ContextOverflowError) as info:
        estimate(parsed, LLAMA_8B)
    assert info.value.prompt_tokens == 8007
    assert info.value.max_output == 500
    assert info.value.context == 8192
    assert info.value.estimated
    assert "8192" in str(info.value)
    ids = parse_request(
        b'{"model":"m","prompt":[' + b",".join([b"1"] * 8192) + b"]}", "/v1/completions"
    )
    with pytest.raises(ContextOverflowError) as no_room:
        estimate(ids, LLAMA_8B)
    assert not no_room.value.estimated


def test_n_samples_share_the_prompt_kv_and_multiply_the_output() -> None:
    one = estimate(parse_request(chat("x" * 400, max_tokens=64), "/v1/chat/completions"), LLAMA_8B)
    four = estimate(
        parse_request(chat("x" * 400, max_tokens=64, n=4), "/v1/chat/completions"), LLAMA_8B
    )
    assert four.input_tokens == one.input_tokens == 107
    assert four.output_tokens == 4 * 64
    # 107 prompt tokens: 6 full blocks shared, then 11 + 64 = 75 tokens -> 5 blocks per sample
    assert four.kv_bytes == (6 + 4 * 5) * 16 * KIB128
    assert one.kv_bytes == (6 + 5) * 16 * KIB128


def test_best_of_and_batched_prompts_scale_the_output() -> None:
    body = b'{"model":"m","prompt":["abcd","efgh"],"max_tokens":10,"best_of":3,"n":1}'
    cost = estimate(parse_request(body, "/v1/completions"), LLAMA_8B)
    assert cost.input_tokens == 2
    assert cost.output_tokens == 10 * 3 * 2


def test_embeddings_have_no_output_and_only_prefill_time() -> None:
    body = b'{"model":"m","input":["abcdefgh","abcd"]}'
    cost = estimate(parse_request(body, "/v1/embeddings"), LLAMA_8B)
    assert cost.input_tokens == 3
    assert cost.output_tokens == 0
    assert cost.kv_gib_seconds == pytest.approx(cost.kv_bytes / GIB * 3 / 8000)


def test_actual_cost_prices_real_usage_and_settlement_gives_deltas() -> None:
    reserved = estimate(
        parse_request(chat("x" * 400, max_tokens=100), "/v1/chat/completions"), LLAMA_8B
    )
    actual = actual_cost(LLAMA_8B, input_tokens=107, output_tokens=20, duration_s=0.5)
    assert actual.kv_bytes == math.ceil(127 / 16) * 16 * KIB128
    assert actual.kv_gib_seconds == pytest.approx(actual.kv_bytes / GIB * 0.5)
    assert actual.price == pytest.approx((107 * 0.10 + 20 * 0.20) / 1e6)
    units = [Unit.REQUESTS, Unit.TOKENS, Unit.OUTPUT_TOKENS, Unit.INPUT_TOKENS, Unit.PRICE]
    deltas = settlement(units, [reserved.amount(u) for u in units], actual)
    assert deltas[:4] == (0.0, -80.0, -80.0, 0.0)
    assert deltas[4] == pytest.approx(-80 * 0.20 / 1e6)
    over = actual_cost(LLAMA_8B, input_tokens=107, output_tokens=150, duration_s=9.0)
    assert settlement([Unit.KV_BYTES], [reserved.kv_bytes], over)[0] > 0


def test_a_request_that_reached_no_backend_is_refunded_all_but_itself() -> None:
    units = [Unit.REQUESTS, Unit.TOKENS, Unit.KV_GIB_SECONDS]
    assert settlement(units, [1.0, 500.0, 0.25], None) == (0.0, -500.0, -0.25)


@given(
    charged=st.lists(st.floats(0, 1e9), min_size=7, max_size=7),
    used=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.floats(0, 1e3)),
    reached=st.booleans(),
)
def test_settlement_never_refunds_more_than_was_charged(
    charged: list[float], used: tuple[int, int, float], reached: bool
) -> None:
    units = list(Unit)
    input_tokens, output_tokens, gib_s = used
    actual = Cost(
        requests=1.0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        kv_bytes=input_tokens + output_tokens,
        kv_gib_seconds=gib_s,
        price=0.0,
    )
    deltas = settlement(units, charged, actual if reached else None)
    for unit, amount, delta in zip(units, charged, deltas, strict=True):
        assert delta >= -amount
        if unit is Unit.REQUESTS:
            assert delta == 0.0


def test_gib_seconds_follow_how_the_backend_holds_memory() -> None:
    block = 16 * KIB128
    # 160 prompt tokens (10 blocks) + 160 output (10 more), 4 s of which 3 s decoding
    paged = actual_cost(
        LLAMA_8B,
        160,
        160,
        4.0,
        holding=Holding(growing=True, reserved_output_tokens=800, decode_s=3.0),
    )
    # the prompt's 10 blocks for 4 s, the output's 10 growing from 0 over 3 s: 40 + 15
    assert paged.kv_gib_seconds == pytest.approx(55 * block / GIB)
    up_front = actual_cost(
        LLAMA_8B, 160, 160, 4.0, holding=Holding(growing=False, reserved_output_tokens=800)
    )
    # prompt + all 800 reserved output tokens (60 blocks), allocated for 4 s
    assert up_front.kv_gib_seconds == pytest.approx(60 * block * 4.0 / GIB)
    assert paged.kv_bytes == up_front.kv_bytes == 20 * block  # the unit kv_bytes: final size


def test_decode_time_is_apportioned_from_the_profile_when_not_seen() -> None:
    # 8000 prompt tokens take 1 s to prefill, 40 output tokens 1 s to decode: half of 10 s
    cost = actual_cost(LLAMA_8B, 8000, 40, 10.0, holding=Holding(True, 40))
    prompt_bytes = 500 * 16 * KIB128
    output_bytes = (math.ceil(8040 / 16) - 500) * 16 * KIB128
    assert cost.kv_gib_seconds == pytest.approx((prompt_bytes * 10 + output_bytes * 5 / 2) / GIB)


def test_actual_cost_spreads_output_over_sequences() -> None:
    four = actual_cost(
        LLAMA_8B, input_tokens=107, output_tokens=4 * 64, duration_s=1.0, sequences=4
    )
    assert four.kv_bytes == (6 + 4 * 5) * 16 * KIB128


def test_cost_amount_covers_every_unit() -> None:
    cost = Cost(
        requests=1.0, input_tokens=3, output_tokens=5, kv_bytes=7, kv_gib_seconds=0.5, price=0.25
    )
    expected = {
        Unit.REQUESTS: 1.0,
        Unit.TOKENS: 8.0,
        Unit.INPUT_TOKENS: 3.0,
        Unit.OUTPUT_TOKENS: 5.0,
        Unit.KV_BYTES: 7.0,
        Unit.KV_GIB_SECONDS: 0.5,
        Unit.PRICE: 0.25,
    }
    assert {unit: cost.amount(unit) for unit in Unit} == expected


def test_profile_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="block_size"):
        ModelProfile(32, 8, 128, 2.0, 0, 8192, 1024, 4.0, 8000.0, 40.0, 0.1, 0.2)
    with pytest.raises(ValueError, match="price_input_per_mtok"):
        ModelProfile(32, 8, 128, 2.0, 16, 8192, 1024, 4.0, 8000.0, 40.0, -0.1, 0.2)


class WordCounter:
    """A hand-written TokenCounter: one token per whitespace-separated word."""

    def count(self, text: str) -> int:
        return len(text.split())


def test_a_token_counter_replaces_the_character_rule() -> None:
    parsed = parse_request(chat("one two three", "four"), "/v1/chat/completions")
    assert prompt_tokens(parsed, LLAMA_8B, WordCounter()) == 4 + 2 * 4 + 3
    long = parse_request(chat("w " * 9000, max_tokens=10), "/v1/chat/completions")
    with pytest.raises(ContextOverflowError) as info:
        estimate(long, LLAMA_8B, WordCounter())
    assert not info.value.estimated


def test_tokenizer_json_counter_counts_with_the_tokenizers_package() -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="optional extra kvgate[tokenizers]")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    counter = tokenizer_json_counter(tokenizer.to_str())
    assert counter.count("hello world hello") == 3
    assert counter.count("") == 0
    with pytest.raises(TokenizerUnavailable, match=r"tokenizer\.json"):
        tokenizer_json_counter("{not json")


def test_tiktoken_counter_counts_when_its_encoding_is_available() -> None:
    pytest.importorskip("tiktoken", reason="tiktoken is not installed (optional)")
    try:
        counter = tiktoken_counter("cl100k_base")
    except TokenizerUnavailable as exc:
        pytest.skip(f"the cl100k_base encoding cannot be loaded offline: {exc}")
    assert counter.count("hello world") == 2


def test_a_missing_tokenizer_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(TokenizerUnavailable, match="pip install tiktoken"):
        tiktoken_counter("cl100k_base")
    with pytest.raises(TokenizerUnavailable, match=r"pip install 'kvgate\[tokenizers\]'"):
        tokenizer_json_counter("{}")
