"""The model endpoints that read and do not generate (rerank, score, pooling, classify), and
audio transcription and translation, whose body is multipart.

A reranker reads the query with each document (``query`` + ``documents``); a scorer reads each
pair (``text_1`` with each ``text_2``, or ``queries``/``documents``, or ``data_1``/``data_2``);
pooling and classify read their ``input`` (or ``messages``). Audio costs its file as one
non-text part (the profile's ``image_tokens``) plus its text ``prompt``, and its transcript is
reserved at the model's default output.
"""

from __future__ import annotations

import re

import msgspec

from gateway.proxy.apis.common import (
    BadRequestBody,
    Endpoint,
    ParsedRequest,
    Texts,
    check_model,
    decode,
    max_tokens_of,
    prompt_form,
)


class _Document(msgspec.Struct):
    text: str = ""


class _Rerank(msgspec.Struct):
    model: str
    query: str = ""
    documents: list[str | _Document] = []


class _Score(msgspec.Struct):
    model: str
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None


class _Message(msgspec.Struct):
    content: str | list[_Document] | None = None


class _Pooling(msgspec.Struct):
    model: str
    input: msgspec.Raw = msgspec.Raw()
    messages: list[_Message] | None = None


_RERANK = msgspec.json.Decoder(_Rerank, strict=False)
_SCORE = msgspec.json.Decoder(_Score, strict=False)
_POOLING = msgspec.json.Decoder(_Pooling, strict=False)


def _read(
    endpoint: Endpoint, model: str, texts: Texts, prompts: int, token_ids: int = 0
) -> ParsedRequest:
    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        stream=False,
        include_usage=False,
        texts=tuple(texts.texts),
        char_counts=tuple(texts.char_counts),
        messages=0,
        media=texts.media,
        token_ids=token_ids,
        prompts=max(1, prompts),
        max_tokens=None,
        n=1,
    )


def _pairs(first: list[str], second: list[str]) -> Texts:
    """One segment per pair the model reads: one first text with each second, or pairwise."""
    texts = Texts()
    if len(first) == 1:
        first = first * len(second)
    for a, b in zip(first, second, strict=False):
        texts.add(a)
        texts.add(b)
        texts.segment()
    return texts


def rerank(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_RERANK, body)
    check_model(req.model)
    documents = [d if isinstance(d, str) else d.text for d in req.documents]
    if not documents:
        raise BadRequestBody("`documents` must not be empty", "documents")
    return _read(Endpoint.RERANK, req.model, _pairs([req.query], documents), len(documents))


def _listed(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def score(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_SCORE, body)
    check_model(req.model)
    first = _listed(req.text_1 or req.queries or req.data_1)
    second = _listed(req.text_2 or req.documents or req.data_2)
    if not first or not second:
        raise BadRequestBody("a score request needs two texts or lists of texts to pair")
    texts = _pairs(first, second)
    return _read(Endpoint.SCORE, req.model, texts, len(texts.char_counts))


def pooling(body: bytes, content_type: str = "") -> ParsedRequest:
    """``/pooling`` and ``/classify``."""
    req = decode(_POOLING, body)
    check_model(req.model)
    texts = Texts()
    if req.messages:
        for message in req.messages:
            content = message.content
            if isinstance(content, str):
                texts.add(content)
            for part in content if isinstance(content, list) else ():
                texts.add(part.text)
            texts.segment()
        return _read(Endpoint.POOLING, req.model, texts, 1)
    found, token_ids, prompts = prompt_form(req.input, "input")
    for text in found:
        texts.add(text)
        texts.segment()
    return _read(Endpoint.POOLING, req.model, texts, prompts, token_ids)


_BOUNDARY = re.compile(r'boundary="?(?P<boundary>[^";]+)"?')
_NAME = re.compile(rb'name="(?P<name>[^"]*)"(?:; *filename="(?P<file>[^"]*)")?')
_FIELDS = frozenset((b"model", b"prompt", b"stream", b"max_completion_tokens"))


def _form_fields(body: bytes, content_type: str) -> tuple[dict[bytes, bytes], int]:
    """The text fields that matter of a ``multipart/form-data`` body, and how many files."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise BadRequestBody("an audio request must be multipart/form-data with a boundary")
    delimiter = b"--" + found.group("boundary").encode()
    fields: dict[bytes, bytes] = {}
    files = 0
    for part in body.split(delimiter)[1:]:
        head, _, value = part.partition(b"\r\n\r\n")
        name = _NAME.search(head)
        if name is None:
            continue
        if name.group("file") is not None:
            files += 1
        elif name.group("name") in _FIELDS:
            fields[name.group("name")] = value.removesuffix(b"\r\n")
    return fields, files


def audio(body: bytes, content_type: str = "") -> ParsedRequest:
    """``/v1/audio/transcriptions`` and ``/v1/audio/translations``."""
    fields, files = _form_fields(body, content_type)
    model = fields.get(b"model", b"").decode(errors="replace")
    check_model(model)
    texts = Texts()
    texts.add(fields.get(b"prompt", b"").decode(errors="replace"))
    texts.media = files
    texts.segment()
    limit = fields.get(b"max_completion_tokens")
    try:
        max_tokens = max_tokens_of(int(limit)) if limit else None
    except ValueError:
        message = "`max_completion_tokens` must be an integer"
        raise BadRequestBody(message, "max_completion_tokens") from None
    return ParsedRequest(
        endpoint=Endpoint.AUDIO,
        model=model,
        stream=fields.get(b"stream", b"").strip().lower() == b"true",
        include_usage=False,
        texts=tuple(texts.texts),
        char_counts=tuple(texts.char_counts),
        messages=0,
        media=files,
        token_ids=0,
        prompts=1,
        max_tokens=max_tokens,
        n=1,
    )
