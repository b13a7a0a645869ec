"""Report numbers from a hand-made record set: every expected value below is worked out by hand
from the records (see the comments), not by running the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from loadtest.compare import write_results
from loadtest.generator import PlannedRequest
from loadtest.plots import refusals_series
from loadtest.records import BackendSample, RequestRecord, Result, read_jsonl, write_jsonl
from loadtest.report import (
    TargetSummary,
    fair_shares,
    headline,
    jain,
    percentile,
    render_table,
    summarise,
    table_rows,
)
from loadtest.scenario import Scenario

WEIGHTS = {"a": 1.0, "b": 1.0}
DURATION_S = 10.0
RUN_S = 20.0


def rec(
    i: int,
    tenant: str,
    *,
    scheduled: float,
    sent: float | None,
    done: float | None,
    status: int,
    result: Result,
    stream: bool = False,
    first: float | None = None,
    output: int | None = None,
    planned_output: int = 100,
    **extra: object,
) -> RequestRecord:
    return RequestRecord(
        id=i,
        tenant=tenant,
        stream=stream,
        scheduled_s=scheduled,
        sent_s=sent,
        first_token_s=first,
        done_s=done,
        status=status,
        result=result,
        ttft_s=None if first is None else first - scheduled,
        latency_s=None if done is None or result is not Result.OK else done - scheduled,
        prompt_tokens=None if output is None else 50,
        output_tokens=output,
        planned_prompt_tokens=50,
        planned_output_tokens=planned_output,
        max_tokens=1024,
        slo_ttft_s=1.0,
        slo_latency_s=5.0,
        **extra,  # type: ignore[arg-type]
    )


OK, LIMITED, SHED = Result.OK, Result.RATE_LIMITED, Result.SHED
RECORDS = [
    # in SLO: ttft 0.5 <= 1, latency 2 <= 5
    rec(1, "a", scheduled=0, sent=0.1, first=0.5, done=2, status=200, result=OK, stream=True,
        output=100, planned_output=100),
    # in SLO: not streamed, latency 3
    rec(2, "a", scheduled=1, sent=1, done=4, status=200, result=OK, output=50, planned_output=50),
    # ok, out of SLO: ttft 2.5
    rec(3, "a", scheduled=2, sent=2.2, first=4.5, done=6, status=200, result=OK, stream=True,
        output=80, planned_output=80),
    # ok, out of SLO: latency 6
    rec(4, "b", scheduled=3, sent=3, first=3.4, done=9, status=200, result=OK, stream=True,
        output=120, planned_output=120),
    rec(5, "b", scheduled=4, sent=4, done=4.1, status=429, result=LIMITED, retries=1,
        retry_after_s=2.0, retry_after_honoured=True, attempt_statuses=[429, 429]),
    rec(6, "b", scheduled=5, sent=5, done=5.2, status=503, result=SHED),
    rec(7, "a", scheduled=6, sent=6.5, done=7, status=500, result=Result.OOM),
    rec(8, "b", scheduled=7, sent=7, done=7.5, status=502, result=Result.SERVER_ERROR),
    # in SLO: ttft exactly 1.0, latency 4
    rec(9, "b", scheduled=8, sent=8.1, first=9, done=12, status=200, result=OK, stream=True,
        output=60, planned_output=60),
    rec(10, "a", scheduled=9, sent=9, done=None, status=0, result=Result.UNFINISHED),
    rec(11, "b", scheduled=9.5, sent=9.6, done=10, status=400, result=Result.CLIENT_ERROR),
    # refused once, cut while waiting to retry: unfinished, not shed
    rec(12, "b", scheduled=9.8, sent=9.8, done=None, status=503, result=Result.UNFINISHED,
        attempt_statuses=[503]),
]  # fmt: skip


def sample(t: float, **stats: float) -> BackendSample:
    return BackendSample(t_s=t, stats=dict(stats))


SAMPLES = [
    sample(0.0, now_s=100, loading_s=10, busy_s=50, idle_s=40, kv_utilisation_avg=0.5,
           oom_errors=2, preemptions=1, generated_tokens=1000),
    sample(19.0, now_s=160, loading_s=10, busy_s=95, idle_s=55, kv_utilisation_avg=0.6,
           oom_errors=5, preemptions=4, generated_tokens=5000),
    # after the span (20 s): must be ignored
    sample(25.0, now_s=999, loading_s=0, busy_s=0, idle_s=999, kv_utilisation_avg=0.0,
           oom_errors=99, preemptions=99, generated_tokens=99),
]  # fmt: skip


def test_counts_goodput_and_percentiles_from_records() -> None:
    s = summarise(RECORDS, WEIGHTS, DURATION_S, RUN_S, SAMPLES)
    # one request was cut, so the span is the whole run: 20 s
    assert s.span_s == 20.0
    # good tokens: #1 100 + #2 50 (a), #9 60 (b) = 210 over 20 s
    assert s.goodput_tokens_per_s == pytest.approx(10.5)
    assert s.output_tokens_per_s == pytest.approx((100 + 50 + 80 + 120 + 60) / 20)
    assert (s.requests, s.ok, s.within_slo) == (12, 5, 3)
    assert (s.limited_429, s.shed_503, s.errors_5xx, s.oom) == (1, 1, 1, 1)
    assert (s.unfinished, s.other_failures) == (2, 1)
    # TTFTs of ok streams: 0.4, 0.5, 1.0, 2.5 (nearest rank: 2nd, 4th, 4th)
    assert (s.p50_ttft_s, s.p90_ttft_s, s.p99_ttft_s) == pytest.approx((0.5, 2.5, 2.5))
    # latencies of ok: 2, 3, 4, 4, 6 (3rd, 5th, 5th)
    assert (s.p50_latency_s, s.p90_latency_s, s.p99_latency_s) == pytest.approx((4, 6, 6))
    # shares 5/7 and 2/7 over weight shares 1/2: x = 10/7, 4/7; (14/7)^2 / (2 * 116/49)
    assert s.jain_fairness == pytest.approx(196 / 232)
    assert s.tenants["a"].goodput_tokens == 150
    assert s.tenants["b"].goodput_share == pytest.approx(2 / 7)
    assert s.tenants["a"].offered_output_tokens == 100 + 50 + 80 + 100 + 100
    assert (s.retries, s.refused_after_honoured_wait) == (1, 1)
    assert s.max_send_lag_s == pytest.approx(0.5)
    # steady window 2.5-10 s, tokens spread over each request's generation: #1 (0.5-2) none;
    # #2 (sent 1, done 4, not streamed) half of 50; #9 (first 9, done 12) a third of 60
    assert s.steady_goodput_tokens_per_s == pytest.approx((25 + 20) / 7.5)


def test_backend_figures_are_differences_within_the_span() -> None:
    backend = summarise(RECORDS, WEIGHTS, DURATION_S, RUN_S, SAMPLES).backend
    assert backend is not None
    # serving 90 -> 150 s, KV block-seconds 45 -> 90: 45 / 60
    assert backend.kv_utilisation_mean == pytest.approx(0.75)
    # idle +15 over busy + idle +60
    assert backend.idle_share == pytest.approx(0.25)
    assert (backend.oom_errors, backend.preemptions, backend.output_tokens) == (3, 3, 4000)


def test_span_is_last_answer_when_nothing_was_cut() -> None:
    finished = [r for r in RECORDS if r.result is not Result.UNFINISHED]
    s = summarise(finished, WEIGHTS, DURATION_S, RUN_S)
    assert s.span_s == 12.0  # request 9 answered at 12 s
    assert s.goodput_tokens_per_s == pytest.approx(210 / 20)  # one horizon: the whole run
    assert s.backend is None


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 90) == 9.0
    assert percentile([10.0, 1.0, 5.0], 50) == 5.0


def test_jain_index() -> None:
    assert jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain([0.0, 0.0]) is None


def test_fair_shares_fill_small_demands_first() -> None:
    shares = fair_shares(100.0, {"a": 10.0, "b": 100.0, "c": 100.0}, {"a": 1, "b": 1, "c": 2})
    # a takes its 10; the other 90 split 1:2
    assert shares == pytest.approx({"a": 10.0, "b": 30.0, "c": 60.0})
    enough = fair_shares(100.0, {"a": 10.0, "b": 20.0}, {"a": 1, "b": 1})
    assert enough == pytest.approx({"a": 10.0, "b": 20.0})


def test_table_shows_the_summary_numbers() -> None:
    s = summarise(RECORDS, WEIGHTS, DURATION_S, RUN_S, SAMPLES)
    rows = {row[0]: row[1:] for row in table_rows({"direct": s}, bound=42.0, oracle=21.0)}
    assert rows["metric"] == ["direct"]
    assert rows["goodput tok/s"] == ["10"]
    assert rows["of LP bound"] == ["25%"]
    assert rows["of clairvoyant"] == ["50%"]
    assert rows["429 rate limited"] == ["1"]
    assert rows["OOM"] == ["1"]
    assert rows["TTFT p50/p90/p99 s"] == ["0.50/2.50/2.50"]
    assert rows["latency p50/p90/p99 s"] == ["4.00/6.00/6.00"]
    assert rows["Jain share/weight"] == ["0.845"]
    assert rows["backend KV utilisation"] == ["75%"]
    assert rows["backend idle share"] == ["25%"]
    assert "bound" in render_table({"direct": s}, 42.0, 21.0).splitlines()[0]


SCENARIO = msgspec.convert(
    {
        "name": "hand-made",
        "description": "records written by hand",
        "duration_s": DURATION_S,
        "drain_timeout_s": RUN_S - DURATION_S,
        "tenants": {
            name: {
                "key": f"sk-test-{name}-0000",
                "arrivals": [{"kind": "poisson", "rate_per_s": 1}],
                "prompt_tokens": {"kind": "fixed", "value": 50},
                "output_tokens": {"kind": "fixed", "value": 100},
                "max_tokens": {"kind": "fixed", "value": 1024},
                "slo": {"ttft_s": 1, "latency_s": 5},
            }
            for name in WEIGHTS
        },
    },
    Scenario,
)


def test_summary_json_has_the_agreed_shape(tmp_path: Path) -> None:
    planned = [
        PlannedRequest(
            id=r.id,
            tenant=r.tenant,
            at_s=r.scheduled_s,
            prompt_tokens=50,
            output_tokens=r.planned_output_tokens,
            max_tokens=1024,
            stream=r.stream,
        )
        for r in RECORDS
    ]
    write_results(SCENARIO, planned, tmp_path, {"direct": (RECORDS, SAMPLES)}, {})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"scenario", "seed", "ceiling_tokens_per_s", "targets"} <= summary.keys()
    direct = summary["targets"]["direct"]
    agreed = {
        "goodput_tokens_per_s": 10.5,
        "ok": 5,
        "limited_429": 1,
        "shed_503": 1,
        "errors_5xx": 1,
        "oom": 1,
        "p50_ttft_s": 0.5,
        "p99_ttft_s": 2.5,
        "p99_latency_s": 6.0,
        "jain_fairness": 196 / 232,
    }
    assert {k: direct[k] for k in agreed} == pytest.approx(agreed)
    assert summary["ceiling_tokens_per_s"] == summary["bound_tokens_per_s"] > 0
    assert summary["bound_tokens_per_s"] >= summary["oracle_tokens_per_s"] > 0
    assert direct["bound_share"] == pytest.approx(10.5 / summary["bound_tokens_per_s"])
    assert direct["oracle_share"] == pytest.approx(10.5 / summary["oracle_tokens_per_s"])
    assert read_jsonl(tmp_path / "records-direct.jsonl", RequestRecord) == RECORDS
    report = (tmp_path / "report.md").read_text()
    assert "| ok | 5 |" in report
    assert report.splitlines()[2].startswith("**Verdict:** direct kept the most goodput")
    for image in ("throughput.png", "inflight.png", "refusals.png", "latency_cdf.png"):
        assert (tmp_path / image).read_bytes().startswith(b"\x89PNG")


def test_jsonl_round_trip(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "s.jsonl", SAMPLES)
    assert read_jsonl(tmp_path / "s.jsonl", BackendSample) == SAMPLES


def test_refusals_are_counted_per_second_by_their_final_answer() -> None:
    records = [
        rec(1, "a", scheduled=0.0, sent=0.1, done=0.2, status=429, result=Result.RATE_LIMITED),
        rec(2, "a", scheduled=0.0, sent=0.1, done=1.5, status=429, result=Result.RATE_LIMITED),
        rec(3, "b", scheduled=0.0, sent=1.2, done=None, status=503, result=Result.SHED),
        rec(4, "b", scheduled=0.0, sent=0.5, done=2.5, status=200, result=Result.OK, output=3),
    ]
    times, limited, shed = refusals_series(records, end_s=3.0)
    assert times == [0.0, 1.0, 2.0]
    assert limited == [1.0, 1.0, 0.0]
    assert shed == [0.0, 1.0, 0.0]


def _target(goodput: float, oom: int) -> TargetSummary:
    summary = summarise(RECORDS, WEIGHTS, DURATION_S, RUN_S)
    # a steady window's rate above the bound's must not enter the verdict
    return msgspec.structs.replace(
        summary, goodput_tokens_per_s=goodput, steady_goodput_tokens_per_s=150.0, oom=oom
    )


def test_the_headline_names_the_best_target_against_the_bound_and_the_others() -> None:
    summaries = {
        "direct": _target(25.0, 80),
        "count_limited": _target(50.0, 5),
        "kvgate": _target(90.0, 0),
    }
    assert headline(summaries, bound=100.0) == (
        "**Verdict:** kvgate kept the most goodput, 90% of the upper bound (against "
        "count_limited 50%, direct 25%); OOM errors: direct 80, count_limited 5, kvgate 0."
    )
    assert headline({}, bound=100.0) == "**Verdict:** no target ran."
