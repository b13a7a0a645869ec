"""Decode the few fields of an OpenAI-style request body that routing and cost need.

One msgspec pass per request, typed per endpoint; unknown fields are skipped, not built. The body
is forwarded as received; ``with_usage_requested`` is the one rewrite (ask a streaming backend for
its usage chunk), and it keeps every other top-level value byte for byte.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, TypeVar

import msgspec

_T = TypeVar("_T")
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_Positive = Annotated[int, msgspec.Meta(ge=1)]


class BadRequestBody(ValueError):
    """The body cannot be served: ``message`` for the client, ``param`` the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Endpoint(enum.StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


def endpoint_of(path: str) -> Endpoint | None:
    """The endpoint a request path names (``/v1/chat/completions`` and the like), else None."""
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return Endpoint.CHAT
    if path.endswith("/completions"):
        return Endpoint.COMPLETION
    if path.endswith("/embeddings"):
        return Endpoint.EMBEDDING
    return None


class ParsedRequest(msgspec.Struct, frozen=True, gc=False):
    """What the gateway reads of a request; it is a ``gateway.core.cost.PromptShape``.

    ``texts`` holds every text the model reads (message contents and text parts, names, tool-call
    names and arguments, the raw JSON of ``tools``/``functions``, prompt or input strings);
    ``char_counts`` their characters per chat message, per prompt, and for the tool definitions.
    ``include_usage`` is true only when the client streams and asked for the usage chunk itself.
    """

    endpoint: Endpoint
    model: str
    stream: bool
    include_usage: bool
    texts: tuple[str, ...]
    char_counts: tuple[int, ...]
    messages: int
    media: int
    token_ids: int
    prompts: int
    max_tokens: int | None
    n: int

    @property
    def embedding(self) -> bool:
        return self.endpoint is Endpoint.EMBEDDING


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
    max_tokens: _NonNegative | None = None
    max_completion_tokens: _NonNegative | None = None
    n: _Positive | None = None
    tools: msgspec.Raw = msgspec.Raw()
    functions: msgspec.Raw = msgspec.Raw()


class _Completion(msgspec.Struct):
    model: str
    prompt: msgspec.Raw = msgspec.Raw()
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: _NonNegative | None = None
    n: _Positive | None = None
    best_of: _Positive | None = None


class _Embedding(msgspec.Struct):
    model: str
    input: msgspec.Raw


# Not strict: like the pydantic models of vLLM and SGLang, a number may come as ``16.0`` or ``"16"``
# and a flag as ``"true"``; a body the backend would accept is not refused here.
_CHAT = msgspec.json.Decoder(_Chat, strict=False)
_COMPLETION = msgspec.json.Decoder(_Completion, strict=False)
_EMBEDDING = msgspec.json.Decoder(_Embedding, strict=False)
_STRING = msgspec.json.Decoder(str)
_STRINGS = msgspec.json.Decoder(list[str])
_IDS = msgspec.json.Decoder(list[int])
_ID_LISTS = msgspec.json.Decoder(list[list[int]])
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def _param(message: str) -> str | None:
    """The field a msgspec error names, as ``messages[0].content``."""
    at = _PATH.search(message)
    path = at.group("path") if at else ""
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return path or None


def _prompt_form(raw: msgspec.Raw, field: str) -> tuple[list[str], int, int]:
    """``(texts, token ids, prompts)`` of a ``prompt`` or ``input`` value in any of its four forms:
    a string, a list of strings, a list of token ids, a list of token-id lists."""
    data = bytes(raw).lstrip()
    if not data or data == b"null":
        return [], 0, 1
    try:
        if data[:1] == b'"':
            return [_STRING.decode(data)], 0, 1
        if data[:1] != b"[":
            raise BadRequestBody(
                f"`{field}` must be a string, an array of strings, an array of token ids "
                "or an array of token-id arrays",
                field,
            )
        first = data[1:].lstrip()[:1]
        if first == b"]":
            raise BadRequestBody(f"`{field}` must not be empty", field)
        if first == b'"':
            texts = _STRINGS.decode(data)
            return texts, 0, len(texts)
        if first == b"[":
            id_lists = _ID_LISTS.decode(data)
            return [], sum(map(len, id_lists)), len(id_lists)
        return [], len(_IDS.decode(data)), 1
    except msgspec.ValidationError as exc:
        message = str(exc).replace(" - at `$", f" - at `$.{field}", 1)
        raise BadRequestBody(message, _param(message)) from exc


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequestBody(str(exc), _param(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise BadRequestBody(f"the body is not valid JSON: {exc}") from exc


def _check_model(model: str) -> None:
    if not model.strip():
        raise BadRequestBody("`model` must name a model", "model")


def _chat(body: bytes) -> ParsedRequest:
    req = _decode(_CHAT, body)
    _check_model(req.model)
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
    for raw in (req.tools, req.functions):
        if len(raw):
            texts.append(bytes(raw).decode())
            char_counts.append(len(texts[-1]))
    stream = bool(req.stream)
    max_tokens = req.max_completion_tokens
    return ParsedRequest(
        endpoint=Endpoint.CHAT,
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


def _completion(body: bytes) -> ParsedRequest:
    req = _decode(_COMPLETION, body)
    _check_model(req.model)
    texts, token_ids, prompts = _prompt_form(req.prompt, "prompt")
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


def _embedding(body: bytes) -> ParsedRequest:
    req = _decode(_EMBEDDING, body)
    _check_model(req.model)
    texts, token_ids, prompts = _prompt_form(req.input, "input")
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


_PARSERS = {Endpoint.CHAT: _chat, Endpoint.COMPLETION: _completion, Endpoint.EMBEDDING: _embedding}


def parse_request(body: bytes, path: str) -> ParsedRequest:
    """Decode ``body`` for the endpoint ``path`` names.

    Raises ``BadRequestBody`` for malformed JSON (msgspec's message, with its byte position), a
    missing or empty ``model``, a field of the wrong type or range, an empty prompt, or a path
    that is not one of the endpoints (check ``endpoint_of`` first to answer those with 404).
    """
    endpoint = endpoint_of(path)
    if endpoint is None:
        raise BadRequestBody(
            f"POST {path} is not served here: use /v1/chat/completions, /v1/completions "
            "or /v1/embeddings"
        )
    return _PARSERS[endpoint](body)


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


class _ModelOnly(msgspec.Struct):
    model: str | None = None


_model_only = msgspec.json.Decoder(_ModelOnly)


def model_of(body: bytes) -> str | None:
    """The ``model`` of a JSON body on a path the gateway has no cost rules for (e.g. vLLM's
    ``/tokenize``, rerankers); None when the body is not JSON or names no model."""
    try:
        return _model_only.decode(body).model
    except msgspec.DecodeError:
        return None
