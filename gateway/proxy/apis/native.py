"""The backends' own APIs: Ollama (``/api/chat``, ``/api/generate``, ``/api/embed``),
llama.cpp (``/completion``, ``/infill``, ``/embedding``) and the ``/generate`` of TGI and SGLang
(TGI's ``/generate_stream`` too).

Their output limits are ``options.num_predict`` (Ollama), ``n_predict`` (llama.cpp) and
``max_new_tokens`` (TGI ``parameters``, SGLang ``sampling_params``); a negative one means "until
the context is full" and reserves the model's default. Ollama streams unless told not to.
Only Ollama requires a ``model``; the others serve one model (the policy's ``fallback_model``).
"""

from __future__ import annotations

import msgspec

from gateway.proxy.apis.common import (
    BadRequestBody,
    Endpoint,
    ParsedRequest,
    Positive,
    Texts,
    check_model,
    decode,
    max_tokens_of,
    prompt_form,
)


class _Options(msgspec.Struct):
    num_predict: int | None = None


class _Function(msgspec.Struct):
    name: str = ""
    arguments: msgspec.Raw = msgspec.Raw()


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _OllamaMessage(msgspec.Struct):
    content: str | None = None
    images: list[msgspec.Raw] | None = None
    tool_calls: list[_ToolCall] | None = None


class _OllamaChat(msgspec.Struct):
    model: str
    messages: list[_OllamaMessage] = []
    tools: msgspec.Raw = msgspec.Raw()
    stream: bool = True
    options: _Options | None = None


class _OllamaGenerate(msgspec.Struct):
    model: str
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    images: list[msgspec.Raw] | None = None
    stream: bool = True
    options: _Options | None = None


class _OllamaEmbed(msgspec.Struct):
    model: str
    input: msgspec.Raw = msgspec.Raw()
    prompt: str | None = None  # the older /api/embeddings


class _Extra(msgspec.Struct):
    text: str = ""


class _LlamaCpp(msgspec.Struct):
    model: str = ""
    prompt: msgspec.Raw = msgspec.Raw()
    input_prefix: str | None = None  # /infill
    input_suffix: str | None = None
    input_extra: list[_Extra] | None = None
    n_predict: int | None = None
    stream: bool = False


class _LlamaCppEmbedding(msgspec.Struct):
    model: str = ""
    content: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()


class _Parameters(msgspec.Struct):
    max_new_tokens: int | None = None
    best_of: Positive | None = None
    n: Positive | None = None


class _Generate(msgspec.Struct):
    model: str = ""
    inputs: str | None = None  # TGI
    text: msgspec.Raw = msgspec.Raw()  # SGLang: a string or a batch of them
    input_ids: msgspec.Raw = msgspec.Raw()
    parameters: _Parameters | None = None  # TGI
    sampling_params: _Parameters | None = None  # SGLang
    stream: bool = False


_OLLAMA_CHAT = msgspec.json.Decoder(_OllamaChat, strict=False)
_OLLAMA_GENERATE = msgspec.json.Decoder(_OllamaGenerate, strict=False)
_OLLAMA_EMBED = msgspec.json.Decoder(_OllamaEmbed, strict=False)
_LLAMACPP = msgspec.json.Decoder(_LlamaCpp, strict=False)
_LLAMACPP_EMBEDDING = msgspec.json.Decoder(_LlamaCppEmbedding, strict=False)
_GENERATE = msgspec.json.Decoder(_Generate, strict=False)


def _parsed(
    endpoint: Endpoint,
    model: str,
    texts: Texts,
    *,
    stream: bool = False,
    messages: int = 0,
    token_ids: int = 0,
    prompts: int = 1,
    max_tokens: int | None = None,
    n: int = 1,
) -> ParsedRequest:
    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        stream=stream,
        include_usage=False,
        texts=tuple(texts.texts),
        char_counts=tuple(texts.char_counts),
        messages=messages,
        media=texts.media,
        token_ids=token_ids,
        prompts=prompts,
        max_tokens=max_tokens,
        n=n,
    )


def _num_predict(options: _Options | None) -> int | None:
    return max_tokens_of(options.num_predict if options is not None else None)


def ollama_chat(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_OLLAMA_CHAT, body)
    check_model(req.model)
    texts = Texts()
    for message in req.messages:
        texts.add(message.content)
        texts.media += len(message.images or ())
        for call in message.tool_calls or ():
            if call.function is not None:
                texts.add(call.function.name)
                texts.add_raw(call.function.arguments)
        texts.segment()
    if len(req.tools):
        texts.add_raw(req.tools)
        texts.segment()
    return _parsed(
        Endpoint.OLLAMA_CHAT,
        req.model,
        texts,
        stream=req.stream,
        messages=len(req.messages),
        max_tokens=_num_predict(req.options),
    )


def ollama_generate(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_OLLAMA_GENERATE, body)
    check_model(req.model)
    texts = Texts()
    for text in (req.system, req.prompt, req.suffix):
        texts.add(text)
    texts.media += len(req.images or ())
    texts.segment()
    return _parsed(
        Endpoint.OLLAMA_GENERATE,
        req.model,
        texts,
        stream=req.stream,
        max_tokens=_num_predict(req.options),
    )


def ollama_embed(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_OLLAMA_EMBED, body)
    check_model(req.model)
    found, token_ids, prompts = prompt_form(req.input, "input")
    texts = _each([*found, req.prompt or ""])
    return _parsed(Endpoint.OLLAMA_EMBED, req.model, texts, token_ids=token_ids, prompts=prompts)


def _each(strings: list[str]) -> Texts:
    """One counted segment per prompt string."""
    texts = Texts()
    for text in strings:
        if text:
            texts.add(text)
            texts.segment()
    return texts


def _loose_prompt(raw: msgspec.Raw, field: str) -> tuple[list[str], int, int]:
    """A prompt in one of the four forms, else (llama.cpp also takes strings and token ids
    mixed) its JSON text as the estimate."""
    try:
        return prompt_form(raw, field)
    except BadRequestBody:
        return [bytes(raw).decode(errors="replace")], 0, 1


def llamacpp_completion(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_LLAMACPP, body)
    found, token_ids, prompts = _loose_prompt(req.prompt, "prompt")
    extra = [e.text for e in req.input_extra or ()]
    texts = _each([req.input_prefix or "", req.input_suffix or "", *extra, *found])
    return _parsed(
        Endpoint.LLAMACPP_COMPLETION,
        req.model,
        texts,
        stream=req.stream,
        token_ids=token_ids,
        prompts=prompts,
        max_tokens=max_tokens_of(req.n_predict),
    )


def llamacpp_embedding(body: bytes, content_type: str = "") -> ParsedRequest:
    req = decode(_LLAMACPP_EMBEDDING, body)
    raw = req.content if len(req.content) else req.input
    found, token_ids, prompts = _loose_prompt(raw, "content")
    return _parsed(
        Endpoint.LLAMACPP_EMBEDDING,
        req.model,
        _each(found),
        token_ids=token_ids,
        prompts=prompts,
    )


def generate(body: bytes, content_type: str = "") -> ParsedRequest:
    """TGI's and SGLang's ``/generate``."""
    return _generate(body, stream=None)


def generate_stream(body: bytes, content_type: str = "") -> ParsedRequest:
    """TGI's ``/generate_stream``: always a stream."""
    return _generate(body, stream=True)


def _generate(body: bytes, *, stream: bool | None) -> ParsedRequest:
    req = decode(_GENERATE, body)
    found, token_ids, prompts = prompt_form(req.text, "text")
    if len(req.input_ids):
        _, token_ids, prompts = prompt_form(req.input_ids, "input_ids")
    params = req.parameters or req.sampling_params or _Parameters()
    return _parsed(
        Endpoint.GENERATE,
        req.model,
        _each([req.inputs or "", *found]),
        stream=req.stream if stream is None else stream,
        token_ids=token_ids,
        prompts=prompts,
        max_tokens=max_tokens_of(params.max_new_tokens),
        n=max(params.n or 1, params.best_of or 1),
    )
