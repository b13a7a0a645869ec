"""Token usage as a backend reports it in its answer, for every answer shape the gateway relays.
Pure: msgspec only, no I/O.

``AnswerShape`` names how an API reports usage. A JSON answer is read whole (``usage_of_json``);
a long answer relayed as a stream is read from its end (``usage_in_tail``); a stream of events
(SSE, or Ollama's NDJSON lines) is read event by event (``usage_of_event``, which
``gateway.proxy.sse`` calls on the few events ``EventRules.has_usage`` points at).

Numbers are not trusted: a negative count is treated as unreported (the estimate stands), and
anything else is bounded later against the model (``gateway.core.cost.sane_usage``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import msgspec


class AnswerShape(enum.Enum):
    OPENAI = "openai"  # a `usage` block: chat, completions, embeddings, pooling, rerank
    RESPONSES = "responses"  # `usage` in the answer, or in a stream's `response.completed`
    ANTHROPIC = "anthropic"  # `usage`; in streams `message_start` then `message_delta`
    OLLAMA = "ollama"  # top-level `prompt_eval_count` / `eval_count`; NDJSON streams
    LLAMACPP = "llamacpp"  # `tokens_evaluated` / `tokens_predicted`, or `timings`
    GENERATE = "generate"  # TGI `details.generated_tokens`, SGLang `meta_info`

    # Members are singletons: hashed by identity, in C, for the reader tables looked up per
    # answer (``Enum.__hash__`` is a Python-level call).
    __hash__ = object.__hash__


class Usage(msgspec.Struct, frozen=True, gc=False):
    """Tokens in and out as reported (None: not reported), and the answer's id where the API
    lets a later request refer to it (the Responses API's ``previous_response_id``)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    answer_id: str | None = None

    def merged(self, later: Usage) -> Usage:
        """This usage updated by a later report of the same answer (a stream's next event)."""
        return Usage(
            later.input_tokens if later.input_tokens is not None else self.input_tokens,
            later.output_tokens if later.output_tokens is not None else self.output_tokens,
            later.answer_id if later.answer_id is not None else self.answer_id,
        )


class _Block(msgspec.Struct, gc=False):
    """A ``usage`` object in any of its spellings."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def usage(self, answer_id: str | None = None) -> Usage:
        prompt = _count(self.prompt_tokens)
        if prompt is None:
            prompt = _count(self.input_tokens)
            if prompt is not None:
                # Anthropic counts cached prompt tokens apart; the model read them all.
                prompt += (_count(self.cache_creation_input_tokens) or 0) + (
                    _count(self.cache_read_input_tokens) or 0
                )
        output = _count(self.completion_tokens)
        if output is None:
            output = _count(self.output_tokens)
        if prompt is None and output is None:
            # Rerank and score answers report only a total: all of it was read.
            prompt = _count(self.total_tokens)
        return Usage(prompt, output, answer_id)


def _count(value: int | None) -> int | None:
    return value if value is not None and value >= 0 else None


# the key with its object: a string value "usage" (a token's text in logprobs) is not the key
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')


class _Answer(msgspec.Struct, gc=False):
    id: str | None = None
    usage: _Block | None = None


class _Ollama(msgspec.Struct, gc=False):
    prompt_eval_count: int | None = None
    eval_count: int | None = None


class _Timings(msgspec.Struct, gc=False):
    prompt_n: int | None = None
    predicted_n: int | None = None


class _LlamaCpp(msgspec.Struct, gc=False):
    tokens_evaluated: int | None = None
    tokens_predicted: int | None = None
    timings: _Timings | None = None


class _Details(msgspec.Struct, gc=False):
    generated_tokens: int | None = None


class _MetaInfo(msgspec.Struct, gc=False):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Generate(msgspec.Struct, gc=False):
    details: _Details | None = None
    meta_info: _MetaInfo | None = None


class _ResponsesEvent(msgspec.Struct, gc=False):
    response: _Answer | None = None


class _AnthropicEvent(msgspec.Struct, gc=False):
    message: _Answer | None = None
    usage: _Block | None = None


_answer = msgspec.json.Decoder(_Answer, strict=False)
_block = msgspec.json.Decoder(_Block, strict=False)
_ollama = msgspec.json.Decoder(_Ollama, strict=False)
_llamacpp = msgspec.json.Decoder(_LlamaCpp, strict=False)
_generate = msgspec.json.Decoder(_Generate | list[_Generate], strict=False)
_responses_event = msgspec.json.Decoder(_ResponsesEvent, strict=False)
_anthropic_event = msgspec.json.Decoder(_AnthropicEvent, strict=False)


def _of_ollama(data: bytes) -> Usage:
    answer = _ollama.decode(data)
    return Usage(_count(answer.prompt_eval_count), _count(answer.eval_count))


def _of_llamacpp(data: bytes) -> Usage:
    answer = _llamacpp.decode(data)
    prompt, output = _count(answer.tokens_evaluated), _count(answer.tokens_predicted)
    if answer.timings is not None:
        prompt = prompt if prompt is not None else _count(answer.timings.prompt_n)
        output = output if output is not None else _count(answer.timings.predicted_n)
    return Usage(prompt, output)


def _of_generate(data: bytes) -> Usage:
    decoded = _generate.decode(data)
    answers = decoded if isinstance(decoded, list) else [decoded]
    prompt = output = None
    for answer in answers:  # SGLang answers a batch with a list, one entry per prompt
        if answer.meta_info is not None:
            prompt = _add(prompt, _count(answer.meta_info.prompt_tokens))
            output = _add(output, _count(answer.meta_info.completion_tokens))
        elif answer.details is not None:  # TGI reports no prompt count
            output = _add(output, _count(answer.details.generated_tokens))
    return Usage(prompt, output)


def _add(total: int | None, value: int | None) -> int | None:
    if value is None:
        return total
    return value if total is None else total + value


def _of_answer(data: bytes) -> Usage:
    answer = _answer.decode(data)
    if answer.usage is None:
        return Usage(None, None, answer.id)
    return answer.usage.usage(answer.id)


_JSON_READERS = {
    AnswerShape.OPENAI: _of_answer,
    AnswerShape.RESPONSES: _of_answer,
    AnswerShape.ANTHROPIC: _of_answer,
    AnswerShape.OLLAMA: _of_ollama,
    AnswerShape.LLAMACPP: _of_llamacpp,
    AnswerShape.GENERATE: _of_generate,
}


def usage_of_json(shape: AnswerShape, body: bytes) -> Usage | None:
    """The usage a whole JSON answer reports; None when it reports none or is not JSON."""
    try:
        usage = _JSON_READERS[shape](body)
    except (msgspec.DecodeError, RecursionError):
        return None
    return usage if usage != Usage() else None


def _of_responses_event(data: bytes) -> Usage:
    response = _responses_event.decode(data).response
    if response is None:
        return Usage()
    return response.usage.usage(response.id) if response.usage else Usage(None, None, response.id)


def _of_anthropic_event(data: bytes) -> Usage:
    event = _anthropic_event.decode(data)
    if event.message is not None and event.message.usage is not None:  # message_start
        return event.message.usage.usage()
    if event.usage is not None:  # message_delta: the output so far, not an increment
        return event.usage.usage()
    return Usage()


def _of_openai_event(data: bytes) -> Usage:
    block = _answer.decode(data).usage
    return block.usage() if block is not None else Usage()


_EVENT_READERS = {
    AnswerShape.OPENAI: _of_openai_event,
    AnswerShape.RESPONSES: _of_responses_event,
    AnswerShape.ANTHROPIC: _of_anthropic_event,
    AnswerShape.OLLAMA: _of_ollama,
    AnswerShape.LLAMACPP: _of_llamacpp,
    AnswerShape.GENERATE: _of_generate,
}


def usage_of_event(shape: AnswerShape, data: bytes) -> Usage | None:
    """The usage one stream event (its ``data``, or one NDJSON line) reports, else None."""
    try:
        usage = _EVENT_READERS[shape](data)
    except (msgspec.DecodeError, RecursionError):
        return None
    return usage if usage != Usage() else None


@dataclass(frozen=True, slots=True)
class EventRules:
    """Cheap scans over a stream's raw events: which may carry usage (only those are decoded)
    and which carry a token (counted, where no usage comes, at about one token each)."""

    has_usage: re.Pattern[bytes]
    has_token: re.Pattern[bytes]


_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')  # servers send `"usage": null` on every chunk
EVENT_RULES = {
    AnswerShape.OPENAI: EventRules(_USAGE_OBJECT, re.compile(rb'"choices"\s*:\s*\[\s*\{')),
    AnswerShape.RESPONSES: EventRules(
        re.compile(rb'"usage"\s*:\s*\{|"type"\s*:\s*"response\.created"'),
        re.compile(rb'"type"\s*:\s*"response\.output_text\.delta"'),
    ),
    AnswerShape.ANTHROPIC: EventRules(_USAGE_OBJECT, re.compile(rb'"content_block_delta"')),
    AnswerShape.OLLAMA: EventRules(
        re.compile(rb'"done"\s*:\s*true'), re.compile(rb'"done"\s*:\s*false')
    ),
    AnswerShape.LLAMACPP: EventRules(
        re.compile(rb'"timings"|"tokens_predicted"'), re.compile(rb'"stop"\s*:\s*false')
    ),
    AnswerShape.GENERATE: EventRules(
        re.compile(rb'"details"\s*:\s*\{|"meta_info"'), re.compile(rb'"token"\s*:\s*\{')
    ),
}


def usage_in_tail(shape: AnswerShape, tail: bytes) -> Usage | None:
    """The usage at the end of a long answer: the last whole ``"usage": {...}`` object of a JSON
    body, or for the native APIs the last whole line (Ollama's NDJSON ends with its counts).

    The object is found by matching braces outside strings from the key on, so a brace or a
    quote inside a string value does not end it early; a tail cut inside the object gives None.
    """
    if shape not in (AnswerShape.OPENAI, AnswerShape.RESPONSES, AnswerShape.ANTHROPIC):
        return usage_of_event(shape, tail.rstrip().rsplit(b"\n", 1)[-1])
    start = max((key.end() - 1 for key in _USAGE_KEY.finditer(tail)), default=-1)
    if start < 0:
        return None
    end = _object_end(tail, start)
    if end is None:
        return None
    try:
        usage = _block.decode(tail[start:end]).usage()
    except (msgspec.DecodeError, RecursionError):
        return None
    return usage if usage != Usage() else None


_BACKSLASH, _QUOTE, _OPEN, _CLOSE = 0x5C, 0x22, 0x7B, 0x7D


def _object_end(data: bytes, start: int) -> int | None:
    """Index just past the object that opens at ``start``; None when ``data`` ends first."""
    depth = 0
    quoted = escaped = False
    for i in range(start, len(data)):
        char = data[i]
        if quoted:
            if escaped:
                escaped = False
            elif char == _BACKSLASH:
                escaped = True
            elif char == _QUOTE:
                quoted = False
        elif char == _QUOTE:
            quoted = True
        elif char == _OPEN:
            depth += 1
        elif char == _CLOSE:
            depth -= 1
            if depth == 0:
                return i + 1
    return None
