"""The OpenAI Responses API (``POST /v1/responses``), and what the gateway remembers of the
answers it relayed, so a request that continues one (``previous_response_id``) is not costed
blind: the server prepends those turns, which the body does not show.

The prompt is ``instructions``, every ``input`` item (messages with text and image parts,
function calls and their outputs, reasoning summaries) and the ``tools``; the output is reserved
at ``max_output_tokens``, else the model's default.
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


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None
    refusal: str | None = None


class _Item(msgspec.Struct):
    type: str = "message"
    content: str | list[_Part] | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[_Part] | None = None
    summary: list[_Part] | None = None


class _Request(msgspec.Struct):
    model: str
    input: str | list[_Item] = ""
    instructions: str | None = None
    tools: msgspec.Raw = msgspec.Raw()
    max_output_tokens: NonNegative | None = None
    stream: bool | None = None
    previous_response_id: str | None = None


_REQUEST = msgspec.json.Decoder(_Request, strict=False)


def _parts(texts: Texts, parts: str | list[_Part] | None) -> None:
    if isinstance(parts, str):
        texts.add(parts)
        return
    for part in parts or ():
        text = part.text if part.text is not None else part.refusal
        if text is not None:
            texts.add(text)
        else:  # input_image, input_file, input_audio
            texts.media += 1


def parse(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_REQUEST, body)
    check_model(req.model)
    texts = Texts()
    messages = 0
    if req.instructions:
        texts.add(req.instructions)
        texts.segment()
        messages += 1
    items = [_Item(content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        # Every item is rendered as one turn of the chat template: messages, function calls and
        # their outputs alike.
        _parts(texts, item.content)
        _parts(texts, item.output)
        _parts(texts, item.summary)
        texts.add(item.name)
        texts.add(item.arguments)
        texts.segment()
        messages += 1
    return texts.conversation(
        Endpoint.RESPONSES,
        req.model,
        stream=bool(req.stream),
        messages=messages,
        tools=req.tools,
        max_tokens=req.max_output_tokens,
        previous_response_id=req.previous_response_id,
    )
