"""The limits check's arithmetic: windowed rates from counters and records, KV held from records
and from the simulator's integral, and the policy and trace it runs with."""

from __future__ import annotations

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.loader import load_text
from loadtest import limits_check as lc
from loadtest.generator import plan
from loadtest.records import BackendSample, RequestRecord, Result

SIM = lc.SIM
BLOCK_BYTES = SIM.block_size * SIM.kv_bytes_per_token


def record(
    *,
    done_s: float,
    prompt: int = 100,
    output: int = 50,
    first_token_s: float | None = None,
    result: Result = Result.OK,
) -> RequestRecord:
    return RequestRecord(
        id=0,
        tenant=lc.KV,
        stream=first_token_s is not None,
        scheduled_s=0.0,
        sent_s=0.0,
        first_token_s=first_token_s,
        done_s=done_s,
        status=200 if result is Result.OK else 429,
        result=result,
        prompt_tokens=prompt,
        output_tokens=output,
        planned_prompt_tokens=prompt,
        planned_output_tokens=output,
        max_tokens=1000,
        slo_ttft_s=1.0,
        slo_latency_s=1.0,
    )


def test_value_at_interpolates_inside_and_refuses_outside() -> None:
    series = [(0.0, 0.0), (1.0, 10.0), (3.0, 30.0)]
    assert lc.value_at(series, 0.5) == pytest.approx(5.0)
    assert lc.value_at(series, 2.0) == pytest.approx(20.0)
    assert lc.value_at(series, 3.0) == 30.0
    assert lc.value_at(series, 3.5) is None
    assert lc.value_at([], 1.0) is None
    assert lc.rate(series, 0.5, 2.0) == pytest.approx(10.0)
    assert lc.rate(series, 0.5, 4.0) is None


@given(
    slope=st.floats(0.0, 1e5),
    offset=st.floats(0.0, 1e6),
    times=st.lists(st.floats(0.0, 100.0), min_size=3, max_size=40, unique=True),
)
def test_both_rates_recover_a_steady_counter(
    slope: float, offset: float, times: list[float]
) -> None:
    series = [(t, offset + slope * t) for t in sorted(times)]
    start, end = series[0][0], series[-1][0]
    if end - start < 1.0:
        return
    assert lc.rate(series, start, end) == pytest.approx(slope, rel=1e-6, abs=1e-6)
    assert lc.fitted_rate(series, start, end) == pytest.approx(slope, rel=1e-6, abs=1e-6)


def test_fitted_rate_is_not_moved_by_one_lumpy_end() -> None:
    # A steady 100/s whose last sample caught a large request settling: the delta is dragged
    # up by it, the fitted slope barely.
    series = [(float(t), 100.0 * t) for t in range(61)]
    series[-1] = (60.0, 6000.0 + 600.0)
    assert lc.rate(series, 0.0, 60.0) == pytest.approx(110.0)
    fitted = lc.fitted_rate(series, 0.0, 60.0)
    assert fitted is not None
    assert 100.0 < fitted < 101.0


def test_tokens_per_min_counts_successes_that_ended_in_the_window() -> None:
    records = [
        record(done_s=5.0, prompt=1000, output=200),  # before the window
        record(done_s=10.0, prompt=1000, output=200),  # at its start: inside
        record(done_s=20.0, prompt=3000, output=800),
        record(done_s=25.0, prompt=9999, output=1, result=Result.RATE_LIMITED),
        record(done_s=40.0, prompt=1000, output=200),  # at its end: outside
    ]
    assert lc.tokens_per_min(records, 10.0, 40.0) == pytest.approx((1200 + 3800) * 2.0)


def test_kv_from_records_counts_blocks_over_the_part_of_the_span_inside_the_window() -> None:
    prefill_s = 1600 / (SIM.prefill_tokens_per_s * SIM.time_scale)
    # 1600 prompt + 16 output tokens = 101 blocks, held from prefill (first token - prefill_s)
    # to the last byte: 0.1 s before the window opens and 4 s inside it.
    inside = record(done_s=14.0, prompt=1600, output=16, first_token_s=10.0 - 0.1 + prefill_s)
    unstreamed = record(done_s=12.0, prompt=1600, output=16)  # no first token: cannot be placed
    failed = record(done_s=12.0, first_token_s=11.0, result=Result.STREAM_ERROR)
    held = lc.kv_held_from_records([inside, unstreamed, failed], 10.0, 20.0, SIM, growing=False)
    assert held == pytest.approx(101 * BLOCK_BYTES * 4.0 / 10.0)


def test_growing_kv_starts_at_the_prompt_and_ends_below_the_final_size() -> None:
    prefill_s = 1600 / (SIM.prefill_tokens_per_s * SIM.time_scale)
    req = record(done_s=12.0, prompt=1600, output=33, first_token_s=2.0)
    final = lc.kv_held_from_records([req], 0.0, 20.0, SIM, growing=False)
    growing = lc.kv_held_from_records([req], 0.0, 20.0, SIM, growing=True)
    # Prefill holds the prompt's 100 blocks; decoding writes tokens 1..32 (the 33rd is sent,
    # never written back): 101 blocks while 1..16 are written, 102 while 17..32 are. The
    # gateway's count holds 1633 tokens' 103 blocks throughout.
    expected = (100 * prefill_s + (16 * 101 + 16 * 102) / 32 * 10.0) * BLOCK_BYTES / 20.0
    assert growing == pytest.approx(expected)
    assert final == pytest.approx(103 * BLOCK_BYTES * (10.0 + prefill_s) / 20.0)
    assert growing < final


@given(
    spans=st.lists(
        st.tuples(st.floats(0.0, 50.0), st.floats(0.01, 20.0), st.integers(10, 8000)),
        min_size=1,
        max_size=20,
    ),
    cut=st.floats(1.0, 59.0),
    growing=st.booleans(),
)
def test_kv_from_records_adds_up_over_adjacent_windows(
    spans: list[tuple[float, float, int]], cut: float, growing: bool
) -> None:
    records = [
        record(done_s=first + length, prompt=prompt, output=50, first_token_s=first)
        for first, length, prompt in spans
    ]
    whole = lc.kv_held_from_records(records, 0.0, 60.0, SIM, growing=growing) * 60.0
    left = lc.kv_held_from_records(records, 0.0, cut, SIM, growing=growing) * cut
    right = lc.kv_held_from_records(records, cut, 60.0, SIM, growing=growing) * (60.0 - cut)
    assert left + right == pytest.approx(whole, rel=1e-9, abs=1e-3)


def sim_sample(t_s: float, used_share: float, time_scale: float) -> BackendSample:
    # The simulator's running average over its serving time, after a cold first second.
    now = t_s * time_scale
    average = used_share * max(0.0, now - time_scale) / now if now else 0.0
    stats: dict[str, object] = {"now_s": now, "loading_s": 0, "kv_utilisation_avg": average}
    return BackendSample(t_s=t_s, stats=stats)


def test_sim_kv_held_reads_the_simulators_own_integral() -> None:
    samples = [sim_sample(t / 2, 0.125, SIM.time_scale) for t in range(1, 60)]
    capacity = SIM.kv_blocks * BLOCK_BYTES
    assert lc.sim_kv_held(samples, 5.0, 25.0, SIM) == pytest.approx(0.125 * capacity)
    assert lc.sim_kv_held(samples, 5.0, 45.0, SIM) is None  # past the last sample
    assert lc.sim_kv_held([BackendSample(t_s=1.0, stats={})], 0.0, 1.0, SIM) is None


EXPOSITION = f"""# TYPE kvgate_tokens_total counter
kvgate_tokens_total{{tenant="{lc.TOKENS}",model="m",kind="input"}} 1000.0
kvgate_tokens_total{{tenant="{lc.TOKENS}",model="m",kind="output"}} 250.0
kvgate_tokens_total{{tenant="{lc.KV}",model="m",kind="input"}} 7.0
# TYPE kvgate_kv_byte_seconds_total counter
kvgate_kv_byte_seconds_total{{tenant="{lc.KV}",model="m"}} 3.5
# TYPE kvgate_requests_total counter
kvgate_requests_total{{tenant="{lc.KV}",model="m",outcome="ok",status="200"}} 12.0
kvgate_requests_total{{tenant="{lc.KV}",model="m",outcome="rate_limited",status="429"}} 30.0
kvgate_requests_total{{tenant="{lc.KV}",model="m",outcome="upstream_client_error",status="400"}} 2.0
kvgate_requests_total{{tenant="{lc.KV}",model="m",outcome="upstream_client_error",status="404"}} 1.0
kvgate_requests_total{{tenant="unknown",model="unknown",outcome="unauthorized",status="401"}} 1.0
"""


def test_counters_are_read_per_tenant_from_the_exposition() -> None:
    assert lc.settled(EXPOSITION, "kvgate_tokens_total", lc.TOKENS) == 1250.0
    assert lc.settled(EXPOSITION, "kvgate_kv_byte_seconds_total", lc.KV) == 3.5
    assert lc.settled(EXPOSITION, "kvgate_kv_gib_seconds_total", lc.TOKENS) == 0.0
    outcomes = {"ok": 12, "rate_limited": 30, "upstream_client_error": 3}
    assert lc.outcomes(EXPOSITION) == {lc.KV: outcomes}


def test_the_policy_loads_in_the_gateway_schema() -> None:
    urls = {lc.TOKENS: "http://127.0.0.1:9001", lc.KV: "http://127.0.0.1:9002"}
    loaded = load_text(yaml.safe_dump(lc.policy(urls, 8080)), "limits-check")
    assert {m: model.backends[0].url for m, model in loaded.models.items()} == {
        lc.MODELS[name]: url for name, url in urls.items()
    }
    assert [(limit.unit, limit.rate) for limit in loaded.tenants[lc.TOKENS].limits] == [
        ("tokens", "240000/min")
    ]
    assert [limit.unit for limit in loaded.tenants[lc.KV].limits] == ["kv_gib_seconds"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_tenant_is_offered_two_to_three_and_a_half_times_its_limit(seed: int) -> None:
    scens = lc.scenarios(seed, 80.0)
    tokens, kv = plan(scens[lc.TOKENS]), plan(scens[lc.KV])
    assert 2.0 <= lc.offered_per_min(tokens, 20.0, 80.0) / lc.TOKENS_PER_MIN <= 3.5
    assert 2.0 <= lc.offered_gib_s_per_s(kv, 20.0, 80.0, SIM) / lc.KV_GIB_S_PER_S <= 3.5
    largest = max(p.prompt_tokens + p.max_tokens for p in [*tokens, *kv])
    assert largest <= lc.TOKENS_BURST  # every request can pass the bucket


def test_summary_of_a_run_that_holds_its_limits_meets_both_aims() -> None:
    scens = lc.scenarios(1, 80.0)
    per_s = lc.TOKENS_PER_MIN / 60.0
    ticks = [float(t) for t in range(0, 86)]
    run = lc.Run(
        records={lc.TOKENS: [], lc.KV: []},
        sims={
            lc.TOKENS: [],
            lc.KV: [sim_sample(t, 2.0 * 2**30 / (SIM.kv_blocks * BLOCK_BYTES), 2.0) for t in ticks],
        },
        counters={
            lc.TOKENS: [(t, per_s * t) for t in ticks],
            lc.KV: [(t, lc.KV_GIB_S_PER_S * t) for t in ticks],
        },
        outcomes={},
    )
    check = lc.summarise(run, scens, 20.0)
    assert check.window_s == (20.0, 80.0)
    assert check.tokens.gateway_per_min == pytest.approx(lc.TOKENS_PER_MIN)
    assert check.kv.gateway_gib == pytest.approx(2.0)
    assert check.kv.backend_gib == pytest.approx(2.0)
    assert check.tokens.aim_met
    assert check.kv.aim_met_gateway
    assert check.kv.aim_met_backend
    assert "aim MISSED" not in lc.render(check)


def test_each_class_share_is_of_the_tokens_it_asked_for() -> None:
    small, large = 500, lc.LARGE_PROMPT
    records = [
        record(done_s=1.0, prompt=small, output=100),
        record(done_s=1.0, prompt=small, output=100, result=Result.RATE_LIMITED),
        record(done_s=1.0, prompt=large, output=0),
        record(done_s=1.0, prompt=large, output=0, result=Result.RATE_LIMITED),
        record(done_s=1.0, prompt=large, output=0, result=Result.RATE_LIMITED),
        record(done_s=1.0, prompt=2 * large, output=0),
    ]
    summary = lc.requests_summary([], records)
    assert summary.served_small == pytest.approx(0.5)
    assert summary.served_large == pytest.approx(3 / 5)
    assert summary.large_to_small == pytest.approx(1.2)


def test_scale_multiplies_the_tokens_tenant_only() -> None:
    urls = {lc.TOKENS: "http://127.0.0.1:9001", lc.KV: "http://127.0.0.1:9002"}
    loaded = load_text(yaml.safe_dump(lc.policy(urls, 8080, wait=True, scale=4.0)), "limits-check")
    (tokens,) = loaded.tenants[lc.TOKENS].limits
    assert (tokens.rate, tokens.burst, tokens.wait) == ("960000/min", 64_000.0, True)
    assert [limit.unit for limit in loaded.tenants[lc.KV].limits] == ["kv_gib_seconds"]
    scens = lc.scenarios(1, 80.0, scale=4.0)
    base = lc.scenarios(1, 80.0)
    offered = lc.offered_per_min(plan(scens[lc.TOKENS]), 20.0, 80.0) / (4 * lc.TOKENS_PER_MIN)
    assert 2.0 <= offered <= 3.5  # the same overload, four times the requests
    assert len(plan(scens[lc.TOKENS])) > 3 * len(plan(base[lc.TOKENS]))
    assert plan(scens[lc.KV]) == plan(base[lc.KV])
    gpu = lc.sim_for(lc.TOKENS, 4.0)
    assert gpu.kv_blocks == 4 * SIM.kv_blocks
    # as many output tokens a second per sequence at four times the batch
    assert lc.decode_tokens_per_s(gpu, 4 * lc.TYPICAL_BATCH) == pytest.approx(
        lc.decode_tokens_per_s(SIM)
    )
    assert lc.sim_for(lc.KV, 4.0) == SIM


def _check(seed: int, ratio: float, rate_limited: int) -> lc.LimitsCheck:
    check = lc.summarise(
        lc.Run(
            records={lc.TOKENS: [], lc.KV: []},
            sims={lc.TOKENS: [], lc.KV: []},
            counters={lc.TOKENS: [], lc.KV: []},
            outcomes={},
        ),
        lc.scenarios(seed, 30.0),
        20.0,
    )
    requests = check.requests[lc.TOKENS]
    shares = {"served_small": 0.4, "served_large": 0.4 * ratio, "large_to_small": ratio}
    return msgspec.structs.replace(
        check,
        requests={lc.TOKENS: msgspec.structs.replace(requests, **shares)},
        gateway_outcomes={lc.TOKENS: {"rate_limited": rate_limited, "ok": 10}},
    )


def test_the_summary_holds_the_aim_only_when_every_run_does() -> None:
    good = lc.summary([_check(1, 0.95, 300), _check(2, 1.08, 500), _check(3, 1.0, 400)])
    assert [run.seed for run in good.runs] == [1, 2, 3]
    assert good.median_large_to_small == pytest.approx(1.0)
    assert good.median_rate_limited == 400
    assert good.aim_met_every_run
    assert "MET in every run" in lc.render_summary(good)
    one_off = lc.summary([_check(1, 0.95, 300), _check(2, 0.85, 500)])
    assert one_off.median_large_to_small == pytest.approx(0.9)  # the median alone would pass
    assert not one_off.aim_met_every_run
    assert "MISSED" in lc.render_summary(one_off)


def test_retries_are_counted_from_the_attempts() -> None:
    first = msgspec.structs.replace(record(done_s=1.0), attempt_statuses=[200])
    second = msgspec.structs.replace(record(done_s=1.0), attempt_statuses=[429, 200])
    again = msgspec.structs.replace(
        record(done_s=1.0, result=Result.RATE_LIMITED), attempt_statuses=[429, 429, 429]
    )
    summary = lc.requests_summary([], [first, second, again])
    assert summary.ok_at_first == pytest.approx(0.5)
    assert summary.retry_ok == pytest.approx(0.5)
    assert lc.requests_summary([], [first]).retry_ok is None
