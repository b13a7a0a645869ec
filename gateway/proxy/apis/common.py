"""What every API's parser shares: the ``ParsedRequest`` they all produce (the core's
``PromptShape``), the error a body that cannot be served raises, and the decoding helpers.

Each parser reads only what cost needs, in one msgspec pass; unknown fields are skipped, not
built. Decoders are not strict: like the pydantic models of vLLM and SGLang, a number may come
as ``16.0`` or ``"16"`` and a flag as ``"true"``; a body the backend would accept is not refused.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, TypeVar

import msgspec

_T = TypeVar("_T")
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


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
    RESPONSES = "responses"
    MESSAGES = "messages"
    OLLAMA_CHAT = "ollama_chat"
    OLLAMA_GENERATE = "ollama_generate"
    OLLAMA_EMBED = "ollama_embed"
    LLAMACPP_COMPLETION = "llamacpp_completion"
    LLAMACPP_EMBEDDING = "llamacpp_embedding"
    GENERATE = "generate"  # TGI and SGLang
    RERANK = "rerank"
    SCORE = "score"
    POOLING = "pooling"
    AUDIO = "audio"
    UNKNOWN = "unknown"  # a path without cost rules, estimated from its body's length


# Endpoints whose answer is computed from the prompt alone: no output tokens, no decode.
_NO_OUTPUT = frozenset(
    (
        Endpoint.EMBEDDING,
        Endpoint.OLLAMA_EMBED,
        Endpoint.LLAMACPP_EMBEDDING,
        Endpoint.RERANK,
        Endpoint.SCORE,
        Endpoint.POOLING,
    )
)


class ParsedRequest(msgspec.Struct, frozen=True, gc=False):
    """What the gateway reads of a request; it is a ``gateway.core.cost.PromptShape``.

    ``texts`` holds every text the model reads (message contents and text parts, names, tool-call
    names and arguments, the raw JSON of tool definitions, prompt or input strings);
    ``char_counts`` their characters per chat message, per prompt, and for the tool definitions.
    ``include_usage`` is true only when the client streams and asked for the usage chunk itself.
    ``model`` is empty where the API lets a request name none (llama.cpp, TGI serve one model).
    ``previous_response_id``: a Responses request that continues an earlier answer, whose turns
    the server prepends; ``token_ids`` then includes what the gateway saw of it.
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
    previous_response_id: str | None = None

    @property
    def embedding(self) -> bool:
        return self.endpoint in _NO_OUTPUT


class Texts:
    """Collects texts and their per-segment character counts while a parser walks a body."""

    __slots__ = ("_start", "char_counts", "media", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.char_counts: list[int] = []
        self.media = 0
        self._start = 0

    def add(self, text: str | None) -> None:
        if text:
            self.texts.append(text)

    def add_raw(self, raw: msgspec.Raw) -> None:
        """A JSON value the model reads as text (tool definitions, tool-call arguments)."""
        if len(raw):
            self.texts.append(raw_text(raw, "tools"))

    def segment(self) -> None:
        """Close one counted segment (a message, a prompt, the tool definitions)."""
        self.char_counts.append(sum(map(len, self.texts[self._start :])))
        self._start = len(self.texts)

    def conversation(
        self,
        endpoint: Endpoint,
        model: str,
        *,
        stream: bool,
        messages: int,
        tools: msgspec.Raw,
        max_tokens: int | None,
        previous_response_id: str | None = None,
    ) -> ParsedRequest:
        """One conversation's request (Responses, Messages): what was collected, the tool
        definitions as a last segment, one prompt, one sequence."""
        if len(tools):
            self.add_raw(tools)
            self.segment()
        return ParsedRequest(
            endpoint=endpoint,
            model=model,
            stream=stream,
            include_usage=False,
            texts=tuple(self.texts),
            char_counts=tuple(self.char_counts),
            messages=messages,
            media=self.media,
            token_ids=0,
            prompts=1,
            max_tokens=max_tokens,
            n=1,
            previous_response_id=previous_response_id,
        )


_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")
_STRING = msgspec.json.Decoder(str)
_STRINGS = msgspec.json.Decoder(list[str])
_IDS = msgspec.json.Decoder(list[int])
_ID_LISTS = msgspec.json.Decoder(list[list[int]])


def param_of(message: str) -> str | None:
    """The field a msgspec error names, as ``messages[0].content``."""
    at = _PATH.search(message)
    path = at.group("path") if at else ""
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return path or None


def decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequestBody(str(exc), param_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise BadRequestBody(f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequestBody(TOO_DEEP) from exc


TOO_DEEP = "the body nests JSON too deeply"


def raw_text(raw: msgspec.Raw, field: str) -> str:
    """A raw JSON value as the text the model reads; invalid UTF-8 is the client's error
    (msgspec checks strings it decodes, not values it keeps raw)."""
    try:
        return bytes(raw).decode()
    except UnicodeDecodeError as exc:
        raise BadRequestBody(f"`{field}` is not valid UTF-8 (byte {exc.start})", field) from exc


def check_model(model: str) -> None:
    if not model.strip():
        raise BadRequestBody("`model` must name a model", "model")


def prompt_form(raw: msgspec.Raw, field: str) -> tuple[list[str], int, int]:
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
        raise BadRequestBody(message, param_of(message)) from exc
    except msgspec.DecodeError as exc:
        raise BadRequestBody(f"`{field}` is not valid JSON: {exc}", field) from exc
    except RecursionError as exc:
        raise BadRequestBody(TOO_DEEP, field) from exc


def max_tokens_of(value: int | None) -> int | None:
    """A native API's output limit, where a negative value means "until the context is full"
    (Ollama's ``num_predict``, llama.cpp's ``n_predict``): the model's default applies."""
    return value if value is not None and value >= 0 else None
