"""The OpenAI-compatible wire format of the simulator: the request fields it reads, prompt tokens
counted from text, the prompt's block hashes for prefix caching, and the JSON of responses,
stream chunks and errors. Pure; no I/O."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

Kind = Literal["chat", "completion"]

# Generated text: 4-character pieces, so output fed back as a prompt counts about one token each
# at the default chars_per_token.
_WORDS = (" the", " qui", "ck b", "rown", " fox", " jum", "ps o", "ver ", "the ", "lazy", " dog")


class WireError(Exception):
    """A request the simulator refuses, with the HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> bytes:
        return error_body(self.message, type_=self.type, param=self.param, code=self.code)


class TextPart(msgspec.Struct):
    type: str = "text"
    text: str = ""  # parts without text (images) count no tokens


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _Request(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    sim_output_tokens: int | None = None  # vendor field: the exact output length to simulate

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

    def output_limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_Request, kw_only=True):
    prompt: str | list[str | int | list[int]]

    def output_limit(self) -> int | None:
        return self.max_tokens


def decode_request(kind: Kind, body: bytes) -> ChatRequest | CompletionRequest:
    """Decode and sanity-check a request body; WireError 400 on anything it cannot serve.
    ``n`` > 1 and batched prompts are refused (one sequence per request keeps accounting exact)."""
    try:
        # Not strict, as vLLM's pydantic models are not: max_tokens 16.0 or "16" is 16.
        req: ChatRequest | CompletionRequest = msgspec.json.decode(
            body, type=ChatRequest if kind == "chat" else CompletionRequest, strict=False
        )
    except msgspec.DecodeError as exc:
        raise WireError(400, f"invalid request body: {exc}") from exc
    if req.n is not None and req.n != 1:
        raise WireError(400, "the simulator serves n=1 only", param="n")
    limit = req.output_limit()
    if limit is not None and limit < 1:
        raise WireError(400, f"max_tokens must be at least 1, got {limit}", param="max_tokens")
    if req.sim_output_tokens is not None and req.sim_output_tokens < 1:
        raise WireError(400, "sim_output_tokens must be at least 1", param="sim_output_tokens")
    return req


def count_prompt_tokens(req: ChatRequest | CompletionRequest, chars_per_token: float) -> int:
    """Prompt tokens as the simulator counts them. Chat: per message ceil(chars / chars_per_token)
    + 4, plus 3 for the reply's priming. Completions: ceil(chars / chars_per_token), or the length
    of a token-id list."""
    if isinstance(req, ChatRequest):
        total = 3
        for msg in req.messages:
            content = msg.content
            if isinstance(content, list):
                chars = sum(len(part.text) for part in content)
            else:
                chars = len(content or "")
            total += math.ceil(chars / chars_per_token) + 4
        return total
    prompt = req.prompt
    if isinstance(prompt, str):
        tokens = math.ceil(len(prompt) / chars_per_token)
    elif all(isinstance(item, int) for item in prompt):
        tokens = len(prompt)
    elif len(prompt) == 1 and isinstance(prompt[0], str):
        tokens = math.ceil(len(prompt[0]) / chars_per_token)
    elif len(prompt) == 1 and isinstance(prompt[0], list):
        tokens = len(prompt[0])
    else:
        raise WireError(400, "the simulator serves one prompt per request", param="prompt")
    if tokens < 1:
        raise WireError(400, "the prompt is empty", param="prompt")
    return tokens


def prompt_block_hashes(
    req: ChatRequest | CompletionRequest, chars_per_token: float, block_size: int
) -> tuple[int, ...]:
    """The prompt's full blocks as vLLM's prefix cache knows them: each block's content hashed
    with its parent block's hash, so equal hashes mean equal prompts up to that block's end.

    The simulator counts tokens from characters, so a block is ``round(block_size *
    chars_per_token)`` characters of the prompt text (chat: the messages' text in order, joined
    as they are; message framing is not hashed), and a token-id prompt's block is
    ``block_size`` ids. Only full blocks count; the engine also ignores any beyond the prompt's
    full token blocks."""
    if isinstance(req, ChatRequest):
        pieces: list[str] = []
        for msg in req.messages:
            content = msg.content
            if isinstance(content, list):
                pieces.extend(part.text for part in content)
            elif content:
                pieces.append(content)
        return _chained("".join(pieces), max(1, round(block_size * chars_per_token)))
    prompt = req.prompt
    if isinstance(prompt, str):
        return _chained(prompt, max(1, round(block_size * chars_per_token)))
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return _chained(prompt[0], max(1, round(block_size * chars_per_token)))
    ids = prompt[0] if len(prompt) == 1 and isinstance(prompt[0], list) else prompt
    return _chained(tuple(i for i in ids if isinstance(i, int)), block_size)


def _chained(content: str | tuple[int, ...], size: int) -> tuple[int, ...]:
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(content) - size + 1, size):
        parent = hash((parent, content[start : start + size]))
        hashes.append(parent)
    return tuple(hashes)


def token_text(index: int) -> str:
    """The text of the ``index``-th generated token (0-based)."""
    return _WORDS[index % len(_WORDS)]


def error_body(
    message: str, *, type_: str, param: str | None = None, code: str | int | None = None
) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(
    kind: Kind, head: dict[str, object], text: str, finish_reason: str, use: dict[str, int]
) -> bytes:
    """A whole non-streaming response; ``head`` holds id, created and model."""
    if kind == "chat":
        choice: dict[str, object] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return msgspec.json.encode(
            {**head, "object": "chat.completion", "choices": [choice], "usage": use}
        )
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return msgspec.json.encode(
        {**head, "object": "text_completion", "choices": [choice], "usage": use}
    )


class ChunkEncoder:
    """Server-sent events of one streamed response. With ``include_usage`` every chunk carries
    ``"usage": null`` and a last chunk with empty ``choices`` carries the usage (as OpenAI)."""

    __slots__ = ("_head", "_include_usage", "_kind")

    def __init__(self, kind: Kind, head: dict[str, object], include_usage: bool) -> None:
        self._kind = kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._head = {**head, "object": obj}
        self._include_usage = include_usage

    def _event(self, choices: list[dict[str, object]], use: dict[str, int] | None) -> bytes:
        chunk: dict[str, object] = {**self._head, "choices": choices}
        if self._include_usage:
            chunk["usage"] = use
        return b"data: " + msgspec.json.encode(chunk) + b"\n\n"

    def _choice(self, piece: str | None, finish_reason: str | None) -> dict[str, object]:
        if self._kind == "chat":
            delta = {} if piece is None else {"content": piece}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        text = "" if piece is None else piece
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> bytes:
        """The first event: chat announces the assistant role; completions have none."""
        if self._kind != "chat":
            return b""
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self._event([{**role, "finish_reason": None}], None)

    def token(self, index: int) -> bytes:
        return self._event([self._choice(token_text(index), None)], None)

    def closing(self, finish_reason: str, use: dict[str, int]) -> bytes:
        """The finish chunk, the usage chunk when asked for, and ``[DONE]``."""
        out = self._event([self._choice(None, finish_reason)], None)
        if self._include_usage:
            out += self._event([], use)
        return out + b"data: [DONE]\n\n"
