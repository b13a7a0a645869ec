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

_encode = msgspec.json.Encoder().encode


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


class AccessLog:
    """One JSON line per request, to stderr, written in batches.

    Going through ``logging`` costs a record object, a lock and a flushed write per request:
    tens of microseconds, more than the rest of the gateway's own work. Lines here are encoded
    once and written at most every ``flush_interval_s`` (or when 64 KiB are waiting), by
    ``run`` in the background and at shutdown.
    """

    def __init__(self, stream: BinaryIO | None = None, flush_interval_s: float = 0.2) -> None:
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._flush_interval_s = flush_interval_s
        self._lines: list[bytes] = []
        self._size = 0

    def write(self, record: dict[str, object]) -> None:
        record["ts"] = _wall_clock()
        line = _encode(record) + b"\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= 65536:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data, self._lines, self._size = b"".join(self._lines), [], 0
        try:
            self._stream.write(data)
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
