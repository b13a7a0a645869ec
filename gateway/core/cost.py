"""What a request costs a GPU, in every unit a bucket can count (``gateway.core.types.Unit``).

``estimate`` prices a request before it runs (the reservation: output at its ``max_tokens``);
``actual_cost`` prices what it really used, from the response's usage block; ``settlement`` is
the one rule for what settling a bucket then refunds or charges.

Prompt tokens without a tokenizer follow one documented rule, which the simulated backend in
``loadtest/`` shares: each chat message costs ``ceil(chars / chars_per_token) + 4`` and a chat
adds 3 for the reply's priming; a completion or embeddings prompt costs
``ceil(chars / chars_per_token)``; token ids count one each; every non-text content part (image,
audio, file) costs the profile's ``image_tokens`` (the simulator counts those as 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from gateway.core.tokens import TokenCounter
from gateway.core.types import Unit

# Members read on every request, bound once: on Python 3.11 a read off the class goes through
# the enum metaclass's ``__getattr__`` hook (about 140 ns a read; 3.12 dropped it).
_TOKENS = Unit.TOKENS
_REQUESTS = Unit.REQUESTS
_KV_BYTES = Unit.KV_BYTES
_KV_GIB_SECONDS = Unit.KV_GIB_SECONDS
_PRICE = Unit.PRICE
_INPUT_TOKENS = Unit.INPUT_TOKENS

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat template adds around each message (role markers, separators)."""
PRIMING_TOKENS = 3
"""Tokens a chat template adds once to open the assistant's reply."""
IMAGE_TOKENS = 765
"""Default cost of one image (or other non-text) content part: a 1024x1024 image tiled in 512 px
squares at 170 tokens each plus 85, the most common published scheme; a profile can change it."""
GIB = float(1 << 30)

DTYPE_BYTES: Mapping[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
"""Bytes per KV element for the policy's ``kv.dtype`` names."""

_POSITIVE_FIELDS = (
    "layers",
    "kv_heads",
    "head_dim",
    "dtype_bytes",
    "block_size",
    "context_tokens",
    "default_max_tokens",
    "chars_per_token",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
)
_NON_NEGATIVE_FIELDS = ("price_input_per_mtok", "price_output_per_mtok", "image_tokens")


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """A model's cost parameters, compiled from the policy's model entry.

    Rates are per sequence: ``prefill_tokens_per_s`` for the prompt, ``decode_tokens_per_s`` for
    each output sequence. Prices are per million tokens. ``block_size`` is in tokens.
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: float
    block_size: int
    context_tokens: int
    default_max_tokens: int
    chars_per_token: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    price_input_per_mtok: float
    price_output_per_mtok: float
    image_tokens: int = IMAGE_TOKENS

    def __post_init__(self) -> None:
        for name in _POSITIVE_FIELDS:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in _NON_NEGATIVE_FIELDS:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer and KV head: 2 x layers x kv_heads x head_dim x dtype bytes."""
        return math.ceil(2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes)


class Cost(msgspec.Struct, frozen=True, gc=False):
    """A request's cost. ``output_tokens`` counts every sequence (n samples x prompts)."""

    requests: float
    input_tokens: int
    output_tokens: int
    kv_bytes: int
    kv_gib_seconds: float
    price: float

    def amount(self, unit: Unit) -> float:
        """The cost in ``unit``; ``tokens`` is input plus output."""
        if unit is _TOKENS:
            return float(self.input_tokens + self.output_tokens)
        if unit is _REQUESTS:
            return self.requests
        if unit is _KV_BYTES:
            return float(self.kv_bytes)
        if unit is _KV_GIB_SECONDS:
            return self.kv_gib_seconds
        if unit is _PRICE:
            return self.price
        if unit is _INPUT_TOKENS:
            return float(self.input_tokens)
        return float(self.output_tokens)


def settlement(
    units: Sequence[Unit], reserved: Sequence[float], actual: Cost | None
) -> tuple[float, ...]:
    """Per bucket (its unit, what it was charged), what settling changes: < 0 refunds unused
    reservation, > 0 charges an overrun.

    A request counts in the unit ``requests`` whatever became of it: it was made. With no
    ``actual`` (the request reached no backend, or its client left before anything came back)
    everything else is refunded.
    """
    if len(units) != len(reserved):
        raise ValueError("units and reserved must have the same length")
    deltas = []
    # lengths checked above: strict=True parses its arguments the slow way on 3.11
    for unit, charged in zip(units, reserved, strict=False):
        if unit is _REQUESTS:
            deltas.append(0.0)
        elif actual is None:
            deltas.append(-charged)
        else:
            deltas.append(actual.amount(unit) - charged)
    return tuple(deltas)


class PromptShape(Protocol):
    """What ``estimate`` needs to know of a request (``gateway.proxy.body.ParsedRequest``)."""

    @property
    def texts(self) -> Sequence[str]:
        """Every text the model reads: contents, names, tool calls and definitions, prompts."""
        ...

    @property
    def char_counts(self) -> Sequence[int]:
        """Characters of each separately counted segment of ``texts``: one per chat message,
        per prompt or input, and one for the tool definitions."""
        ...

    @property
    def messages(self) -> int:
        """Chat messages (0 for completions and embeddings)."""
        ...

    @property
    def media(self) -> int:
        """Non-text content parts (images, audio, files), each priced ``image_tokens``."""
        ...

    @property
    def token_ids(self) -> int:
        """Prompt tokens given as token ids, counted exactly."""
        ...

    @property
    def prompts(self) -> int:
        """Independent prompts in the request (a legacy batch or embeddings inputs); >= 1."""
        ...

    @property
    def max_tokens(self) -> int | None:
        """Output tokens asked for per sequence (``max_tokens`` / ``max_completion_tokens``)."""
        ...

    @property
    def n(self) -> int:
        """Sequences sampled per prompt (``n``, or ``best_of`` when larger)."""
        ...

    @property
    def embedding(self) -> bool:
        """An embeddings request: no output tokens."""
        ...


class ContextOverflowError(ValueError):
    """A request that can never fit the model's context window (the client must shorten it)."""

    def __init__(
        self, prompt_tokens: int, max_output: int, context: int, *, estimated: bool = False
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_output = max_output
        self.context = context
        self.estimated = estimated
        approx = "about " if estimated else ""
        super().__init__(
            f"the model's context is {context} tokens, but this request needs "
            f"{approx}{prompt_tokens + max_output} ({approx}{prompt_tokens} in the prompt, "
            f"{max_output} for the output); shorten the prompt or lower max_tokens"
        )


def prompt_tokens(shape: PromptShape, profile: ModelProfile, counter: TokenCounter | None) -> int:
    """Prompt tokens of all the request's prompts, by the rule in the module docstring."""
    if counter is None:
        per_token = profile.chars_per_token
        text_tokens = sum(math.ceil(chars / per_token) for chars in shape.char_counts)
    else:
        text_tokens = sum(counter.count(text) for text in shape.texts)
    overhead = 0
    if shape.messages:
        overhead = MESSAGE_OVERHEAD_TOKENS * shape.messages + PRIMING_TOKENS
    return text_tokens + overhead + shape.token_ids + shape.media * profile.image_tokens


def _kv_blocks(prompt: int, output_per_sequence: int, sequences: int, block_size: int) -> int:
    # The prompt's full blocks are shared by its sampled sequences (paged backends share the
    # prefix for parallel sampling); each sequence owns the prompt's partial last block plus its
    # output. Exact for one prompt; a legacy batch is treated as one prompt of the summed length.
    shared, tail = divmod(prompt, block_size)
    return shared + sequences * -(-(tail + output_per_sequence) // block_size)


def estimate(
    shape: PromptShape, profile: ModelProfile, counter: TokenCounter | None = None
) -> Cost:
    """The reservation for a request: the prompt, and output at its ``max_tokens``.

    Output per sequence is ``max_tokens`` when given, else ``default_max_tokens`` capped by the
    room the prompt leaves in the context. ``n`` sequences per prompt each get that output and
    their own KV for it, sharing the prompt's KV. Duration is prefill (all prompt tokens at
    ``prefill_tokens_per_s``) plus one sequence's output at ``decode_tokens_per_s`` (sequences
    decode in parallel). Raises ``ContextOverflowError`` when the average prompt plus its output
    cannot fit the context (with an estimated prompt, ``estimated`` is set on the error).
    """
    prompt = prompt_tokens(shape, profile, counter)
    prompts = max(1, shape.prompts)
    per_prompt = -(-prompt // prompts)
    context = profile.context_tokens
    estimated = counter is None and any(shape.char_counts)
    if shape.embedding:
        output = 0
        if per_prompt > context:
            raise ContextOverflowError(per_prompt, 0, context, estimated=estimated)
    elif shape.max_tokens is not None:
        output = shape.max_tokens
        if per_prompt + output > context:
            raise ContextOverflowError(per_prompt, output, context, estimated=estimated)
    else:
        room = context - per_prompt
        if room <= 0:
            raise ContextOverflowError(per_prompt, 1, context, estimated=estimated)
        output = min(profile.default_max_tokens, room)
    sequences = prompts * (1 if shape.embedding else max(1, shape.n))
    blocks = _kv_blocks(prompt, output, sequences, profile.block_size)
    kv_bytes = blocks * profile.block_size * profile.kv_bytes_per_token
    duration_s = prompt / profile.prefill_tokens_per_s + output / profile.decode_tokens_per_s
    total_output = output * sequences
    return Cost(
        requests=1.0,
        input_tokens=prompt,
        output_tokens=total_output,
        kv_bytes=kv_bytes,
        kv_gib_seconds=kv_bytes / GIB * duration_s,
        price=_price(profile, prompt, total_output),
    )


class Holding(msgspec.Struct, frozen=True, gc=False):
    """How the backend that served a request held its KV cache, for the GiB·s it is charged.

    ``growing``: a paged backend, whose sequences hold their prompt and grow a block at a time
    as they decode; otherwise the whole sequence (prompt + ``reserved_output_tokens`` per
    sequence) is allocated for the request's whole life. ``decode_s``: seconds from the first
    output token to the end, when the gateway saw it (a stream); else it is apportioned from the
    profile's prefill and decode speeds.
    """

    growing: bool
    reserved_output_tokens: int
    decode_s: float | None = None


def actual_cost(
    profile: ModelProfile,
    input_tokens: int,
    output_tokens: int,
    duration_s: float,
    sequences: int = 1,
    holding: Holding | None = None,
) -> Cost:
    """What a finished request really used: the usage block's token counts and the measured
    duration (seconds from admission to the last byte). ``sequences`` is the number of output
    sequences the ``output_tokens`` are spread over (``n``); KV is laid out as in ``estimate``.

    GiB·s is the KV memory the backend held over time: without ``holding``, the final KV for the
    whole duration (an upper bound); on a growing (paged) backend, the prompt's KV for the whole
    duration plus the output's, growing linearly, over the decode time; on one that allocates up
    front, prompt + reserved output for the whole duration.
    """
    sequences = max(1, sequences)
    duration_s = max(0.0, duration_s)
    per_sequence = -(-output_tokens // sequences)
    block_bytes = profile.block_size * profile.kv_bytes_per_token
    kv_bytes = _kv_blocks(input_tokens, per_sequence, sequences, profile.block_size) * block_bytes
    byte_seconds = kv_bytes * duration_s
    if holding is not None and holding.growing:
        prompt_bytes = _kv_blocks(input_tokens, 0, sequences, profile.block_size) * block_bytes
        decode_s = holding.decode_s
        if decode_s is None:
            prefill = input_tokens / profile.prefill_tokens_per_s
            decode = per_sequence / profile.decode_tokens_per_s
            decode_s = duration_s * decode / (prefill + decode) if prefill + decode else 0.0
        decode_s = min(max(0.0, decode_s), duration_s)
        byte_seconds = prompt_bytes * duration_s + (kv_bytes - prompt_bytes) * decode_s / 2
    elif holding is not None:
        reserved = max(per_sequence, holding.reserved_output_tokens)
        allocated = _kv_blocks(input_tokens, reserved, sequences, profile.block_size)
        byte_seconds = allocated * block_bytes * duration_s
    return Cost(
        requests=1.0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        kv_bytes=kv_bytes,
        kv_gib_seconds=byte_seconds / GIB,
        price=_price(profile, input_tokens, output_tokens),
    )


def sane_usage(
    profile: ModelProfile, sequences: int, input_tokens: int, output_tokens: int
) -> tuple[int, int]:
    """Token counts a backend reported, bounded to what the model can have done: never below
    zero (a refund beyond the reservation, a counter going down), never more than a full
    context per output sequence each (a number no request can reach is not charged whole)."""
    most = profile.context_tokens * max(1, sequences)
    return min(max(0, input_tokens), most), min(max(0, output_tokens), most)


def _price(profile: ModelProfile, input_tokens: int, output_tokens: int) -> float:
    return (
        input_tokens * profile.price_input_per_mtok + output_tokens * profile.price_output_per_mtok
    ) / 1e6
