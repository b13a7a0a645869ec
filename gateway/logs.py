"""Structured logs: one JSON object per line on stderr, for the gateway's events (``logging``
with ``JsonFormatter``) and for requests (``AccessLog``). API keys are never logged: the request
path only ever logs tenant names."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import BinaryIO

import msgspec

_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_encode_lines = _encoder.encode_lines
_BATCH = 1024


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        line["msg"] = record.getMessage()
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


class AccessRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """One request's line in the access log; fields left at None are not written."""

    tenant: str
    model: str
    status: int
    outcome: str
    backend: str | None = None
    duration_s: float | None = None
    queued_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    uncosted: str | None = None  # a path without cost rules: the unknown_endpoints rule applied
    request_id: str | None = None
    ts: str = ""


class AccessLog:
    """One JSON line per request, to stderr, written in batches.

    Going through ``logging`` costs a record object, a lock and a flushed write per request:
    tens of microseconds, more than the rest of the gateway's own work. Records here are kept
    as they are and encoded together at most every ``flush_interval_s`` (or when 1024 are
    waiting), by ``run`` in the background and at shutdown: one encoder call per batch costs a
    fraction of one per line on the request path.
    """

    def __init__(self, stream: BinaryIO | None = None, flush_interval_s: float = 0.2) -> None:
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._flush_interval_s = flush_interval_s
        self._records: list[AccessRecord] = []

    def write(self, record: AccessRecord) -> None:
        record.ts = _wall_clock()
        self._records.append(record)
        if len(self._records) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._records:
            return
        records, self._records = self._records, []
        try:
            self._stream.write(_encode_lines(records))
            self._stream.flush()
        except OSError:
            return  # a closed or full stderr must not take requests down with it

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._flush_interval_s)
                self.flush()
        finally:
            self.flush()


class _WallClock:
    """UTC time as ISO 8601 with milliseconds. The date and time of day are formatted once per
    second: ``strftime`` costs more than the rest of an access-log line."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int((now - second) * 1000):03d}Z"


_wall_clock = _WallClock()
