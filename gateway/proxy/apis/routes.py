"""Which API a request speaks: one table from (method, path) to the parser that costs its body,
the shape its answer reports usage in and the shape its errors take; and the two body rewrites
of a model alias (the served name upstream, the public name back).

A path not in the table is ``UNKNOWN``: the policy's ``server.unknown_endpoints`` says what it
costs. Free paths (tokenizers, model lists, health, metrics, Anthropic's ``count_tokens``) cost
one request and no tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from gateway.proxy.apis import anthropic, native, openai, pooling, responses
from gateway.proxy.apis.common import BadRequestBody, Endpoint, ParsedRequest
from gateway.proxy.responses import ErrorShape
from gateway.proxy.usage import AnswerShape

Parser = Callable[[bytes, str], ParsedRequest]
"""``(body, Content-Type header) -> ParsedRequest``; raises ``BadRequestBody``."""


@dataclass(frozen=True, slots=True)
class Route:
    parse: Parser | None  # None: nothing to cost (free, or unknown)
    answers: AnswerShape = AnswerShape.OPENAI
    errors: ErrorShape = ErrorShape.OPENAI
    asks_usage: bool = False  # a stream gets `stream_options.include_usage` added
    unknown: bool = False  # no cost rules: the policy's `unknown_endpoints` applies


UNKNOWN = Route(None, unknown=True)
_FREE = Route(None)
_CHAT = Route(openai.chat, asks_usage=True)
_COMPLETION = Route(openai.completion, asks_usage=True)
_EMBEDDING = Route(openai.embedding)
_RESPONSES = Route(responses.parse, AnswerShape.RESPONSES)
_MESSAGES = Route(anthropic.parse, AnswerShape.ANTHROPIC, ErrorShape.ANTHROPIC)

_POST: dict[str, Route] = {
    "/v1/chat/completions": _CHAT,
    "/v1/completions": _COMPLETION,
    "/v1/embeddings": _EMBEDDING,
    "/v1/responses": _RESPONSES,
    "/v1/messages": _MESSAGES,
    "/api/chat": Route(native.ollama_chat, AnswerShape.OLLAMA),
    "/api/generate": Route(native.ollama_generate, AnswerShape.OLLAMA),
    "/api/embed": Route(native.ollama_embed, AnswerShape.OLLAMA),
    "/api/embeddings": Route(native.ollama_embed, AnswerShape.OLLAMA),
    "/completion": Route(native.llamacpp_completion, AnswerShape.LLAMACPP),
    "/infill": Route(native.llamacpp_completion, AnswerShape.LLAMACPP),
    "/embedding": Route(native.llamacpp_embedding, AnswerShape.LLAMACPP),
    "/generate": Route(native.generate, AnswerShape.GENERATE),
    "/generate_stream": Route(native.generate_stream, AnswerShape.GENERATE),
    "/v1/rerank": Route(pooling.rerank),
    "/v2/rerank": Route(pooling.rerank),
    "/rerank": Route(pooling.rerank),
    "/v1/score": Route(pooling.score),
    "/score": Route(pooling.score),
    "/pooling": Route(pooling.pooling),
    "/classify": Route(pooling.pooling),
    "/v1/audio/transcriptions": Route(pooling.audio),
    "/v1/audio/translations": Route(pooling.audio),
}
# Under a prefix (`/openai/v1/...`, a deployment path), the OpenAI and Anthropic paths by suffix.
_SUFFIXES = (
    ("/chat/completions", _CHAT),
    ("/completions", _COMPLETION),
    ("/embeddings", _EMBEDDING),
    ("/responses", _RESPONSES),
    ("/messages", _MESSAGES),
)
_FREE_PATHS: dict[str, Route] = {
    path: _FREE
    for path in (
        "/tokenize",
        "/detokenize",
        "/v1/models",
        "/health",
        "/metrics",
        "/version",
        "/ping",
        "/props",
        "/info",
        "/get_model_info",
        "/api/tags",
        "/api/show",
        "/api/ps",
        "/api/version",
    )
}
_FREE_PATHS["/v1/messages/count_tokens"] = Route(None, errors=ErrorShape.ANTHROPIC)


# Paths a client may call besides the costed ones, by method: each flavor's read-only API
# (model lists, tokenizers, health). A GET on a costed path (a stored response) is allowed too.
_OPEN_GET = frozenset(
    (*(p for p in _FREE_PATHS if p not in ("/tokenize", "/detokenize")), "/v1/props")
)
_OPEN_POST = frozenset(
    ("/tokenize", "/detokenize", "/v1/messages/count_tokens", "/api/show", "/apply-template")
)
_OPEN_PREFIXES = ("/v1/models/", "/v1/responses/")
# Backend administration, never proxied whatever the policy opens: model weights, caches,
# memory, profiling, adapters, shutdown (vLLM, SGLang, llama.cpp, Ollama, the simulator).
_ADMIN = re.compile(
    r"^/(v1/)?("
    r"sleep|wake_up|is_sleeping|reset_prefix_cache|reset_mm_cache|collective_rpc"
    r"|start_profile|stop_profile|scale_elastic_ep|pause|resume|shutdown"
    r"|(v1/)?(load|unload)_lora_adapter|update_weights\w*|init_weights_update_group"
    r"|get_weights_by_name|flush_cache|release_memory_occupation|resume_memory_occupation"
    r"|configure_logging|abort_request|slow_down|set_internal_state|freeze_gc|dump_\w*"
    r"|slots/.*|lora-adapters|api/(pull|push|create|copy|delete|blobs/.*)"
    r"|admin(/.*)?|sim(/.*)?"
    r")/?$"
)


def admin_path(path: str) -> bool:
    """A backend's administration path (never proxied)."""
    return _ADMIN.match(path) is not None


def allowed(method: str, path: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether the proxy forwards ``method path``: an API path of a flavor the table knows, or
    one the policy opens (``server.allow_paths``: exact, or a prefix ending in ``*``); never a
    backend administration path."""
    path = path.rstrip("/") or "/"
    if method == "POST" and path in _POST:  # the common case, before the longer checks
        return True
    if admin_path(path):
        return False
    if method == "POST" and route(method, path) is not UNKNOWN:
        return path not in _OPEN_GET or path in _OPEN_POST
    if method in ("GET", "HEAD") and (path in _OPEN_GET or path in _POST):
        return True
    if path.startswith(_OPEN_PREFIXES) or (method == "POST" and path in _OPEN_POST):
        return True
    return any(
        path.startswith(rule[:-1]) if rule.endswith("*") else path == rule.rstrip("/")
        for rule in extra
    )


def route(method: str, path: str) -> Route:
    """The route of a request; ``UNKNOWN`` for a path without cost rules (or a method other
    than POST on a costed path)."""
    path = path.rstrip("/") or "/"
    free = _FREE_PATHS.get(path)
    if free is not None:
        return free
    if method != "POST":
        return UNKNOWN
    found = _POST.get(path)
    if found is not None:
        return found
    for suffix, suffixed in _SUFFIXES:
        if path.endswith(suffix):
            return suffixed
    return UNKNOWN


def parse_request(body: bytes, path: str, content_type: str = "application/json") -> ParsedRequest:
    """Decode the POST ``body`` for the API ``path`` names (``kvgate explain`` and benchmarks).

    Raises ``BadRequestBody`` for malformed JSON (msgspec's message, with its byte position), a
    missing or empty ``model``, a field of the wrong type or range, an empty prompt, or a path
    the gateway has no cost rules for.
    """
    parse = route("POST", path).parse
    if parse is None:
        raise BadRequestBody(f"POST {path} is not an endpoint this gateway can cost")
    return parse(body, content_type)


def estimated(body: bytes, model: str) -> ParsedRequest:
    """A body on a path without cost rules, read as one prompt of its length, with output at
    the model's default (``server.unknown_endpoints: estimate``)."""
    return ParsedRequest(
        endpoint=Endpoint.UNKNOWN,
        model=model,
        stream=False,
        include_usage=False,
        texts=(body.decode(errors="replace"),),
        char_counts=(len(body),),
        messages=0,
        media=0,
        token_ids=0,
        prompts=1,
        max_tokens=None,
        n=1,
    )


class _ModelOnly(msgspec.Struct):
    model: str | None = None


_model_only = msgspec.json.Decoder(_ModelOnly)
_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])


def model_of(body: bytes) -> str | None:
    """The ``model`` of a JSON body on a path without a parser (e.g. vLLM's ``/tokenize``);
    None when the body is not JSON or names no model."""
    try:
        return _model_only.decode(body).model
    except (msgspec.DecodeError, RecursionError):
        return None


def with_model(body: bytes, name: str) -> bytes:
    """``body`` with its top-level ``model`` set to ``name``; every other top-level value is
    copied verbatim. A body that is not a JSON object, or names no model, is returned as is."""
    try:
        top = _TOP.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return body
    if "model" not in top:
        return body
    top["model"] = msgspec.Raw(msgspec.json.encode(name))
    return msgspec.json.encode(top)


def renamer(served: str, public: str) -> Callable[[bytes], bytes]:
    """A rewrite of ``"model": "<served>"`` to the public name, anywhere in an answer (a stream
    names the model in every event, a Responses event in its nested ``response``)."""
    pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(msgspec.json.encode(served)))
    replacement = msgspec.json.encode(public)

    def rename(data: bytes) -> bytes:
        return pattern.sub(lambda match: match.group(1) + replacement, data)

    return rename
