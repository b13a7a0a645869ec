"""The OpenAI API's chat completions, completions and embeddings requests, and the one rewrite
the gateway makes to them: asking a streaming backend for its usage chunk.

``with_usage_requested`` keeps every other top-level value byte for byte.
"""

from __future__ import annotations

import msgspec

from gateway.proxy.apis.common import (
    BadRequestBody,
    Endpoint,
    NonNegative,
    ParsedRequest,
    Positive,
    check_model,
    decode,
    prompt_form,
    raw_text,
)


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None
    refusal: str | None = None


class _Function(msgspec.Struct):
    name: str = ""
    arguments: str = ""


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _Chat(msgspec.Struct):
    model: str
    messages: list[_Message]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: NonNegative | None = None
    max_completion_tokens: NonNegative | None = None
    n: Positive | None = None
    tools: msgspec.Raw = msgspec.Raw()
    functions: msgspec.Raw = msgspec.Raw()


class _Completion(msgspec.Struct):
    model: str
    prompt: msgspec.Raw = msgspec.Raw()
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: NonNegative | None = None
    n: Positive | None = None
    best_of: Positive | None = None


class _Embedding(msgspec.Struct):
    model: str
    input: msgspec.Raw


_CHAT = msgspec.json.Decoder(_Chat, strict=False)
_COMPLETION = msgspec.json.Decoder(_Completion, strict=False)
_EMBEDDING = msgspec.json.Decoder(_Embedding, strict=False)


_CHAT_ENDPOINT = Endpoint.CHAT  # bound once (an enum member read per request on 3.11 is slow)


def chat(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_CHAT, body)
    check_model(req.model)
    texts: list[str] = []
    char_counts: list[int] = []
    media = 0
    for message in req.messages:
        first = len(texts)
        content = message.content
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:
            for part in content:
                if part.text is not None:
                    texts.append(part.text)
                elif part.refusal is not None:
                    texts.append(part.refusal)
                else:
                    media += 1
        if message.name:
            texts.append(message.name)
        if message.tool_calls:
            for call in message.tool_calls:
                if call.function is not None:
                    texts.append(call.function.name)
                    texts.append(call.function.arguments)
        char_counts.append(sum(map(len, texts[first:])))
    for raw, field in ((req.tools, "tools"), (req.functions, "functions")):
        if len(raw):
            texts.append(raw_text(raw, field))
            char_counts.append(len(texts[-1]))
    stream = bool(req.stream)
    max_tokens = req.max_completion_tokens
    return ParsedRequest(
        endpoint=_CHAT_ENDPOINT,
        model=req.model,
        stream=stream,
        include_usage=_include_usage(stream, req.stream_options),
        texts=tuple(texts),
        char_counts=tuple(char_counts),
        messages=len(req.messages),
        media=media,
        token_ids=0,
        prompts=1,
        max_tokens=req.max_tokens if max_tokens is None else max_tokens,
        n=req.n or 1,
    )


def _include_usage(stream: bool, options: _StreamOptions | None) -> bool:
    """The client streams and asked for the usage chunk itself (so it must not be hidden)."""
    return stream and options is not None and bool(options.include_usage)


def completion(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_COMPLETION, body)
    check_model(req.model)
    texts, token_ids, prompts = prompt_form(req.prompt, "prompt")
    stream = bool(req.stream)
    return ParsedRequest(
        endpoint=Endpoint.COMPLETION,
        model=req.model,
        stream=stream,
        include_usage=_include_usage(stream, req.stream_options),
        texts=tuple(texts),
        char_counts=tuple(map(len, texts)),
        messages=0,
        media=0,
        token_ids=token_ids,
        prompts=prompts,
        max_tokens=req.max_tokens,
        n=max(req.n or 1, req.best_of or 1),  # best_of sequences are all generated
    )


def embedding(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_EMBEDDING, body)
    check_model(req.model)
    texts, token_ids, prompts = prompt_form(req.input, "input")
    if not token_ids and not any(map(len, texts)):
        raise BadRequestBody("`input` must not be empty", "input")
    return ParsedRequest(
        endpoint=Endpoint.EMBEDDING,
        model=req.model,
        stream=False,
        include_usage=False,
        texts=tuple(texts),
        char_counts=tuple(map(len, texts)),
        messages=0,
        media=0,
        token_ids=token_ids,
        prompts=prompts,
        max_tokens=None,
        n=1,
    )


_TRUE = msgspec.Raw(b"true")
_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])
_OPTIONS = msgspec.json.Decoder(dict[str, msgspec.Raw] | None)


def with_usage_requested(body: bytes) -> bytes:
    """``body`` with ``stream_options.include_usage`` set to true.

    Every other top-level value is copied verbatim (as raw JSON); only the whitespace between
    top-level members may change. The body must already have passed ``parse_request``.
    """
    top = _TOP.decode(body)
    raw_options = top.get("stream_options")
    options = _OPTIONS.decode(raw_options) if raw_options is not None else None
    options = dict(options) if options else {}
    options["include_usage"] = _TRUE
    top["stream_options"] = msgspec.Raw(msgspec.json.encode(options))
    return msgspec.json.encode(top)
