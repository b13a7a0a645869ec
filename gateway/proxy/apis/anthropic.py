"""The Anthropic Messages API (``POST /v1/messages``), as vLLM and other servers serve it.

The prompt is ``system`` (a string or text blocks), every message's content blocks (text, images
and documents, tool uses with their input, tool results with their own blocks, thinking) and
the ``tools``; the output is reserved at the required ``max_tokens``.
"""

from __future__ import annotations

import msgspec

from gateway.proxy.apis.common import (
    Endpoint,
    NonNegative,
    ParsedRequest,
    Texts,
    check_model,
    decode,
)


class _Inner(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    thinking: str | None = None
    name: str | None = None
    input: msgspec.Raw = msgspec.Raw()
    content: str | list[_Inner] | None = None  # a tool_result's own blocks


class _Message(msgspec.Struct):
    content: str | list[_Block]


class _Request(msgspec.Struct):
    model: str
    max_tokens: NonNegative
    messages: list[_Message]
    system: str | list[_Inner] | None = None
    tools: msgspec.Raw = msgspec.Raw()
    stream: bool | None = None


_REQUEST = msgspec.json.Decoder(_Request, strict=False)


def _inner(texts: Texts, content: str | list[_Inner] | None) -> None:
    if isinstance(content, str):
        texts.add(content)
        return
    for block in content or ():
        if block.text is not None:
            texts.add(block.text)
        else:
            texts.media += 1


def parse(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_REQUEST, body)
    check_model(req.model)
    texts = Texts()
    messages = 0
    if req.system:
        _inner(texts, req.system)
        texts.segment()
        messages += 1
    for message in req.messages:
        if isinstance(message.content, str):
            texts.add(message.content)
        else:
            for block in message.content:
                if block.type in ("image", "document"):
                    texts.media += 1
                texts.add(block.text)
                texts.add(block.thinking)
                texts.add(block.name)
                texts.add_raw(block.input)
                _inner(texts, block.content)
        texts.segment()
        messages += 1
    return texts.conversation(
        Endpoint.MESSAGES,
        req.model,
        stream=bool(req.stream),
        messages=messages,
        tools=req.tools,
        max_tokens=req.max_tokens,
    )
