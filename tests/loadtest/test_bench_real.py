"""The pure parts of the real-backend benchmark: trace to requests, metric parsing, summary and
table. The benchmark itself needs a real server and is not run here."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.schema import Policy
from loadtest.bench_real import TraceSpec, prompt_text, request_body, trace
from loadtest.real_report import (
    Record,
    ServerSample,
    Summary,
    best_limit,
    counter_increase,
    kvgate_figures,
    markdown_table,
    median_summary,
    next_limit,
    parse_metrics,
    percentile,
    summarise,
)
from loadtest.real_targets import GatewaySpec, kvgate_policy, parse_kv
from loadtest.records import Result
from loadtest.scenario import Slo

VLLM_METRICS = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 7.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 3.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 12.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.5
"""


def spec(**kw: float) -> TraceSpec:
    base: dict[str, float] = {
        "requests": 40,
        "prompt_tokens": 1000,
        "output_tokens": 500,
        "rate_per_s": 0.0,
        "seed": 3,
        "slo_ttft_s": 10.0,
        "slo_latency_s": 90.0,
    }
    base.update(kw)
    return TraceSpec(**base)  # type: ignore[arg-type]


def test_a_zero_rate_sends_every_request_at_once_with_the_asked_sizes() -> None:
    planned = trace(spec())
    assert len(planned) == 40
    assert {p.at_s for p in planned} == {0.0}
    assert {(p.prompt_tokens, p.output_tokens, p.max_tokens) for p in planned} == {(1000, 500, 500)}


def test_a_poisson_trace_has_the_count_and_is_the_same_for_one_seed() -> None:
    one, two = trace(spec(rate_per_s=2.0)), trace(spec(rate_per_s=2.0))
    assert len(one) == 40
    assert one == two
    assert [p.at_s for p in one] == sorted(p.at_s for p in one)
    assert one != trace(spec(rate_per_s=2.0, seed=4))


def test_prompts_are_as_long_as_asked_and_start_with_their_own_tag() -> None:
    text = prompt_text(1000, 3.5, "r0 direct 17")
    assert text.startswith("[r0 direct 17] ")
    assert len(text) == 3500
    assert prompt_text(1000, 3.5, "r0 kvgate 17")[:40] != text[:40]


def test_the_body_asks_for_a_fixed_streamed_output() -> None:
    item = trace(spec())[0]
    body = msgspec.json.decode(request_body(item, "tiny", 4.0, "t 0", ignore_eos=True))
    assert body["max_tokens"] == 500
    assert body["ignore_eos"] is True
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    plain = msgspec.json.decode(request_body(item, "tiny", 4.0, "t 0", ignore_eos=False))
    assert "ignore_eos" not in plain


def test_metrics_are_summed_over_series_and_unknown_names_are_absent() -> None:
    names = ["vllm:num_requests_waiting", "vllm:num_preemptions_total", "vllm:missing"]
    assert parse_metrics(VLLM_METRICS, names) == {
        "vllm:num_requests_waiting": 10.0,
        "vllm:num_preemptions_total": 12.0,
    }


def samples(name: str, values: list[float]) -> list[ServerSample]:
    return [ServerSample(t_s=float(i), values={name: v}) for i, v in enumerate(values)]


def test_a_counter_that_drops_is_a_restart_and_counts_from_zero_again() -> None:
    assert counter_increase(samples("c", [5, 7, 7, 10]), "c") == 5
    assert counter_increase(samples("c", [5, 9, 2, 3]), "c") == 4 + 2 + 1
    assert counter_increase(samples("other", [1]), "c") is None


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1), st.floats(0.01, 1.0))
def test_a_percentile_is_a_member_with_enough_of_the_sample_at_or_below(
    values: list[float], q: float
) -> None:
    p = percentile(values, q)
    assert p in values
    assert sum(v <= p for v in values) >= q * len(values)


def record(i: int, ttft: float, latency: float, tokens: int = 100, **kw: object) -> Record:
    base: dict[str, object] = {
        "id": i,
        "scheduled_s": 1.0,
        "status": 200,
        "result": Result.OK,
        "first_token_s": 1.0 + ttft,
        "done_s": 1.0 + latency,
        "gaps_s": [0.1, 0.3],
        "output_tokens": tokens,
    }
    base.update(kw)
    return msgspec.convert(base, Record)


PREEMPT, WAITING = "vllm:num_preemptions_total", "vllm:num_requests_waiting"


def test_summary_counts_slo_goodput_throughput_and_server_figures() -> None:
    records = [
        record(0, ttft=1.0, latency=10.0),
        record(1, ttft=20.0, latency=30.0),  # TTFT over the SLO
        record(2, ttft=2.0, latency=100.0),  # latency over it
        record(3, ttft=0, latency=0, status=503, result=Result.SHED, first_token_s=None),
        record(4, ttft=0, latency=0, status=0, result=Result.CONNECTION_ERROR),
    ]
    server = [
        ServerSample(t_s=0, values={PREEMPT: 3, WAITING: 0}),
        ServerSample(t_s=1, values={PREEMPT: 8, WAITING: 9}),
    ]
    s = summarise(records, server, "vllm", Slo(ttft_s=10, latency_s=90))
    assert (s.requests, s.ok, s.within_slo, s.shed, s.errors) == (5, 3, 1, 1, 1)
    assert s.makespan_s == 100.0
    assert s.throughput_tokens_per_s == 300 / 100.0
    assert s.goodput_tokens_per_s == 100 / 100.0
    assert s.ttft_p50_s == 2.0
    assert s.itl_p99_s == 0.3
    assert s.tpot_p50_s == 10.0 / 99  # the middle one: first token at 20 s, done at 30 s
    assert (s.preemptions, s.waiting_max) == (5, 9)
    longer = summarise(records, server, "vllm", Slo(ttft_s=10, latency_s=90), horizon_s=200.0)
    assert longer.goodput_tokens_per_s == 0.5


def test_llama_cpp_has_no_preemption_counter() -> None:
    deferred = samples("llamacpp:requests_deferred", [4])
    s = summarise([record(0, 1, 2)], deferred, "llamacpp", Slo(ttft_s=1, latency_s=5))
    assert s.preemptions is None
    assert s.waiting_max == 4


def summary(goodput: float, preempt: float | None, **extra: float) -> Summary:
    s = summarise([record(0, 1, 2)], [], "vllm", Slo(ttft_s=10, latency_s=90))
    s.goodput_tokens_per_s, s.preemptions = goodput, preempt
    s.extra.update(extra)
    return s


def test_medians_ignore_missing_values_and_keep_extras() -> None:
    m = median_summary([summary(10, 1, q=1.0), summary(30, None, q=3.0), summary(20, 5)])
    assert m["goodput_tokens_per_s"] == 20
    assert m["preemptions"] == 3
    assert m["q"] == 2.0


def test_the_table_shows_ratios_against_direct() -> None:
    medians = {
        "direct": median_summary([summary(100, 10)]),
        "kvgate": median_summary([summary(150, 2, kvgate_queue_wait_mean_s=3.0)]),
    }
    table = markdown_table(medians, 1)
    assert table.splitlines()[0] == "| median of 1 | direct | kvgate |"
    row = next(line for line in table.splitlines() if line.startswith("| goodput"))
    assert row.endswith("| 100 | 150 (1.50x) |")
    row = next(line for line in table.splitlines() if line.startswith("| server preemptions"))
    assert row.endswith("| 10 | 2 (0.20x) |")
    assert "| kvgate_queue_wait_mean_s | - | 3 |" in table


def test_the_sweep_keeps_the_best_limit_and_the_smaller_on_a_tie() -> None:
    assert best_limit({8: 10.0, 16: 30.0, 24: 20.0}) == 16
    assert best_limit({24: 30.0, 16: 30.0}) == 16


def test_the_sweep_goes_on_past_an_end_that_is_best_and_stops_inside() -> None:
    assert next_limit({8: 10.0, 16: 30.0, 24: 20.0}) is None
    assert next_limit({12: 10.0, 20: 20.0, 28: 30.0}) == 36
    assert next_limit({12: 30.0, 20: 20.0, 28: 10.0}) == 4
    assert next_limit({2: 30.0, 8: 20.0}) == 1
    assert next_limit({1: 30.0, 8: 20.0}) is None
    assert next_limit({16: 30.0}) is None


def test_kvgate_figures_come_from_its_metrics_and_admin_state() -> None:
    metrics = [
        ServerSample(t_s=0, values={"kvgate_queue_depth": 4.0}),
        ServerSample(
            t_s=1,
            values={
                "kvgate_queue_depth": 9.0,
                "kvgate_queue_wait_seconds_sum": 30.0,
                "kvgate_queue_wait_seconds_count": 10.0,
            },
        ),
    ]
    state = {"tiny": {"backends": [{"url": "u", "reserved_bytes": 2**30, "overcommit": 1.2}]}}
    figures = kvgate_figures(metrics, [{"t_s": 0.0, "state": state}])
    assert figures == {
        "kvgate_queue_wait_mean_s": 3.0,
        "kvgate_queue_depth_max": 9.0,
        "kvgate_reserved_gib_max": 1.0,
        "kvgate_overcommit_max": 1.2,
    }


def test_the_generated_policy_is_valid_and_takes_overrides() -> None:
    gw = GatewaySpec(
        model="tiny",
        kv=parse_kv("8,8,128"),
        context=2048,
        chars_per_token=3.2,
        signals="vllm",
        extra={"admission": {"queue": {"target_delay": "30s"}}},
    )
    policy = msgspec.convert(kvgate_policy(gw, "http://127.0.0.1:18100", 9000), Policy)
    model = policy.models["tiny"]
    assert (model.kv.layers, model.kv.kv_heads, model.kv.head_dim, model.kv.dtype) == (
        8,
        8,
        128,
        "bf16",
    )
    assert model.chars_per_token == 3.2
    assert model.backends[0].memory == "paged"
    assert policy.admission.queue.max_wait == "120s"
    assert policy.admission.queue.target_delay == "30s"
    slots = dataclasses.replace(gw, signals="llamacpp", extra={})
    llama = msgspec.convert(kvgate_policy(slots, "http://127.0.0.1:1", 9000), Policy)
    assert llama.models["tiny"].backends[0].signals == "llamacpp"
    assert llama.models["tiny"].backends[0].memory == "contiguous"


def test_a_bad_kv_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="layers,kv_heads,head_dim"):
        parse_kv("8,8")
