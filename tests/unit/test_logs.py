"""The access log: batched JSON lines, fields left unset are not written, a broken stderr never
raises into a request."""

from __future__ import annotations

import io
import re

import msgspec

from gateway.logs import AccessLog, AccessRecord

_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_records_are_written_as_json_lines_on_flush_without_unset_fields() -> None:
    out = io.BytesIO()
    log = AccessLog(stream=out)
    log.write(AccessRecord("acme", "m1", 200, "ok", backend="http://b", input_tokens=3))
    log.write(AccessRecord("unknown", "unknown", 401, "unauthorized"))
    assert out.getvalue() == b""  # nothing is written on the request path
    log.flush()
    lines = [msgspec.json.decode(line) for line in out.getvalue().splitlines()]
    assert all(_TS.match(line.pop("ts")) for line in lines)
    assert lines == [
        {
            "tenant": "acme",
            "model": "m1",
            "status": 200,
            "outcome": "ok",
            "backend": "http://b",
            "input_tokens": 3,
        },
        {"tenant": "unknown", "model": "unknown", "status": 401, "outcome": "unauthorized"},
    ]


def test_each_line_carries_a_utc_timestamp_with_milliseconds() -> None:
    out = io.BytesIO()
    log = AccessLog(stream=out)
    for _ in range(3):
        log.write(AccessRecord("t", "m", 200, "ok"))
    log.flush()
    stamps = [msgspec.json.decode(line)["ts"] for line in out.getvalue().splitlines()]
    assert len(stamps) == 3
    assert all(_TS.match(ts) for ts in stamps), stamps
    assert stamps == sorted(stamps)


def test_a_full_batch_is_written_at_once() -> None:
    out = io.BytesIO()
    log = AccessLog(stream=out, flush_interval_s=3600.0)
    for i in range(1024):
        log.write(AccessRecord("t", "m", 200, "ok", queued_s=float(i)))
    assert len(out.getvalue().splitlines()) == 1024


class _Broken(io.BytesIO):
    def write(self, data: object) -> int:
        raise OSError("No space left on device")


def test_a_failing_stream_loses_the_batch_but_never_raises() -> None:
    log = AccessLog(stream=_Broken())
    log.write(AccessRecord("t", "m", 200, "ok"))
    log.flush()
    log.write(AccessRecord("t", "m", 200, "ok"))
    log.flush()
