"""The pure parts of the loading benchmark: real time to ready, and the timeline it prints."""

from __future__ import annotations

import math

from loadtest.bench_loading import Phase, Sent, ready_in, timeline
from loadtest.real_report import Record
from loadtest.records import Result


def test_time_to_ready_is_counted_from_the_send() -> None:
    assert ready_in(2.0, 8.5) == 6.5
    assert ready_in(9.0, 8.5) is None
    assert ready_in(1.0, None) == math.inf


def test_the_timeline_shows_each_fate_beside_the_real_wait() -> None:
    served = Record(
        id=1,
        scheduled_s=0.5,
        status=200,
        result=Result.OK,
        first_token_s=9.0,
        done_s=12.0,
        output_tokens=32,
    )
    shed = Record(
        id=2,
        scheduled_s=2.5,
        status=503,
        result=Result.SHED,
        done_s=3.7,
        retry_after_s=1.0,
        error="queue delay above target",
    )
    phase = Phase(name="load", server_start_s=0.0, ready_s=8.2)
    phase.sent = [
        Sent(phase="load", record=served, ready_in_s=7.7),
        Sent(phase="load", record=shed, ready_in_s=5.7),
    ]
    lines = timeline(phase).splitlines()
    assert lines[0] == "**load**: server (re)started at 0.0s, ready at 8.2s"
    assert lines[-2] == "| 1 | 0.5 | 7.7 | served | - | 12.0 | 9.0 | 32 |"
    assert lines[-1] == (
        "| 2 | 2.5 | 5.7 | 503 shed (queue delay above target) | 1 | 3.7 | - | - |"
    )
