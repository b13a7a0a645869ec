"""What a load-test run leaves behind: one ``RequestRecord`` per scheduled request, and samples of
the backend's ``/sim/stats`` over time. Both are written as JSON lines; the report is computed
from these files alone.

Times are seconds from the start of the run (the generator's t0), on one monotonic clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import msgspec


class Result(enum.StrEnum):
    """How a request ended, as the client saw it. ``error_type`` keeps the server's own word
    (kvgate's ``Outcome`` value, the simulator's error type) beside it."""

    OK = "ok"
    RATE_LIMITED = "rate_limited"  # 429
    SHED = "shed"  # 503
    OOM = "oom"  # the backend ran out of KV memory for this request
    SERVER_ERROR = "server_error"  # any other 5xx
    CLIENT_ERROR = "client_error"  # any other 4xx
    STREAM_ERROR = "stream_error"  # 200, then an error event or a stream cut short
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"  # the client's own timeout (TenantSpec.timeout_s)
    UNFINISHED = "unfinished"  # still in flight when the drain timeout ended the run


class RequestRecord(msgspec.Struct, kw_only=True, frozen=True):
    """One scheduled request, after its last attempt.

    ``ttft_s`` and ``latency_s`` run from the *scheduled* time, so a late send (generator lag) or
    a retry wait counts against the target as the user would feel it. ``ttft_s`` is set only for
    streamed responses (first content chunk). Token counts come from the response's ``usage``.
    """

    id: int
    tenant: str
    stream: bool
    scheduled_s: float
    sent_s: float | None = None  # first attempt left the client
    first_token_s: float | None = None
    done_s: float | None = None  # last attempt ended (success or not)
    status: int = 0  # HTTP status of the last attempt; 0 if none was received
    result: Result
    error_type: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    planned_prompt_tokens: int
    planned_output_tokens: int
    max_tokens: int
    slo_ttft_s: float
    slo_latency_s: float
    retries: int = 0
    retry_after_s: float | None = None  # the last Retry-After the server gave, in seconds
    retry_after_honoured: bool | None = None  # None: never given; True: every wait was kept
    attempt_statuses: list[int] = []

    def within_slo(self) -> bool:
        if self.result is not Result.OK or self.latency_s is None:
            return False
        if self.latency_s > self.slo_latency_s:
            return False
        return not self.stream or (self.ttft_s is not None and self.ttft_s <= self.slo_ttft_s)


class BackendSample(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /sim/stats`` at ``t_s``; ``stats`` is the simulator's JSON as it sent it."""

    t_s: float
    stats: dict[str, object]


T = TypeVar("T", RequestRecord, BackendSample)


def write_jsonl(path: Path, items: Iterable[msgspec.Struct]) -> None:
    encoder = msgspec.json.Encoder()
    with path.open("wb") as out:
        for item in items:
            out.write(encoder.encode(item))
            out.write(b"\n")


def read_jsonl(path: Path, kind: type[T]) -> list[T]:
    decoder = msgspec.json.Decoder(kind)
    with path.open("rb") as src:
        return [decoder.decode(line) for line in src if line.strip()]
