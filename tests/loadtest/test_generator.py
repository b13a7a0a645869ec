"""The generator: arrival processes and size distributions draw what they say (statistically,
on drawn schedules, never on timing), prompts count as drawn, the client records what a server
answers, and one short run against a real simulator."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sim.wire import ChatRequest, count_prompt_tokens
from loadtest.__main__ import main
from loadtest.generator import (
    MIN_PROMPT_TOKENS,
    PROMPT_OVERHEAD_TOKENS,
    Attempt,
    TraceTooLarge,
    block_hashes,
    chat_messages,
    check_loopback,
    parse_retry_after,
    plan,
    prompt_text,
    retry_wait_s,
    run_trace,
)
from loadtest.records import RequestRecord, Result, read_jsonl
from loadtest.scenario import (
    Bursts,
    Constant,
    Fixed,
    LogNormal,
    Mixture,
    OnOff,
    Pareto,
    Poisson,
    Ramp,
    RetrySpec,
    Scenario,
    Uniform,
)
from loadtest.targets import free_port

SIGMAS = 5.0  # statistical checks allow five standard deviations: a false alarm is ~1e-6


def within(observed: float, expected: float, sd: float) -> bool:
    return abs(observed - expected) <= SIGMAS * sd


# --- arrivals ------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32), rate=st.floats(5, 80))
def test_poisson_count_and_gaps_match_the_rate(seed: int, rate: float) -> None:
    duration = 200.0
    times = Poisson(rate_per_s=rate).times(random.Random(seed), duration)
    expected = rate * duration
    assert within(len(times), expected, math.sqrt(expected))
    assert times == sorted(times)
    assert times[0] >= 0
    assert times[-1] < duration
    gaps = [b - a for a, b in itertools.pairwise(times)]
    n = len(gaps)
    assert within(statistics.fmean(gaps), 1 / rate, (1 / rate) / math.sqrt(n))
    # exponential gaps: P(gap > mean) = 1/e, and the spread equals the mean
    over = sum(g > 1 / rate for g in gaps) / n
    assert within(over, math.exp(-1), math.sqrt(math.exp(-1) * (1 - math.exp(-1)) / n))
    assert within(statistics.stdev(gaps) * rate, 1.0, math.sqrt(2 / n))


def test_constant_arrivals_are_evenly_spaced() -> None:
    times = Constant(rate_per_s=4, start_s=1, end_s=3).times(random.Random(0), 10)
    assert times == [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75]


@given(seed=st.integers(0, 2**32))
@settings(max_examples=10, deadline=None)
def test_ramp_rate_grows_linearly(seed: int) -> None:
    ramp = Ramp(from_rate_per_s=0, to_rate_per_s=100, start_s=0, end_s=100)
    times = ramp.times(random.Random(seed), 100)
    # integral of 100 t / 100 over each half: 1250 then 3750
    first = sum(t < 50 for t in times)
    second = len(times) - first
    assert ramp.expected_count(100) == 5000
    assert within(first, 1250, math.sqrt(1250))
    assert within(second, 3750, math.sqrt(3750))


@given(seed=st.integers(0, 2**32))
@settings(max_examples=10, deadline=None)
def test_on_off_sends_only_while_on(seed: int) -> None:
    process = OnOff(rate_per_s=40, on_s=2, off_s=3, start_s=1)
    times = process.times(random.Random(seed), 101)
    assert all((t - 1) % 5 < 2 for t in times)
    # 20 periods of 5 s in [1, 101): 40 s on
    assert process.expected_count(101) == 40 * 40
    assert within(len(times), 1600, 40)


def test_bursts_are_exact_in_count_and_window() -> None:
    process = Bursts(every_s=10, size=25, spread_s=2, start_s=5)
    times = process.times(random.Random(3), 50)
    assert len(times) == 5 * 25 == process.expected_count(50)  # at 5, 15, 25, 35 and 45
    assert all((t - 5) % 10 < 2 for t in times)


def test_bursts_cut_at_the_window_end() -> None:
    process = Bursts(every_s=10, size=10, spread_s=0)
    assert len(process.times(random.Random(0), 25)) == 30  # at 0, 10 and 20


# --- sizes ---------------------------------------------------------------------------------

N = 20000


def draws(dist: Fixed | Uniform | LogNormal | Pareto | Mixture, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [dist.draw(rng) for _ in range(N)]


def test_fixed_and_uniform() -> None:
    assert set(draws(Fixed(value=77))) == {77}
    values = draws(Uniform(low=100, high=200))
    assert min(values) == 100
    assert max(values) == 200
    sd = math.sqrt((101**2 - 1) / 12)
    assert within(statistics.fmean(values), 150, sd / math.sqrt(N))


def test_lognormal_median_spread_and_caps() -> None:
    values = draws(LogNormal(median=300, sigma=0.8, min=10, max=5000))
    assert min(values) >= 10
    assert max(values) <= 5000
    logs = [math.log(v) for v in values]
    # sample median of a normal: sd 1.2533 sigma / sqrt(n); rounding moves it by < 1/300
    assert (
        abs(statistics.median(logs) - math.log(300)) <= SIGMAS * 1.2533 * 0.8 / math.sqrt(N) + 0.004
    )
    assert within(statistics.stdev(logs), 0.8, 0.8 * math.sqrt(1 / (2 * N)) + 0.01)


def test_pareto_tail() -> None:
    values = draws(Pareto(min=1000, alpha=1.5, max=100000))
    assert min(values) >= 1000
    assert max(values) <= 100000
    for x in (2000, 8000, 30000):
        p = (1000 / x) ** 1.5
        share = sum(v > x for v in values) / N
        assert within(share, p, math.sqrt(p * (1 - p) / N))
    assert 100000 in values  # P(X > max) = 1e-3: about 20 of them hit the cap


def test_mixture_weights() -> None:
    mixture = msgspec.convert(
        {
            "kind": "mixture",
            "components": [
                {"weight": 4, "size": {"kind": "fixed", "value": 100}},
                {"weight": 1, "size": {"kind": "uniform", "low": 5000, "high": 6000}},
            ],
        },
        Mixture,
    )
    values = draws(mixture)
    long_share = sum(v >= 5000 for v in values) / N
    assert within(long_share, 0.2, math.sqrt(0.2 * 0.8 / N))
    assert set(values) - {100} <= set(range(5000, 6001))


# --- prompts and the trace -----------------------------------------------------------------


@given(tokens=st.integers(MIN_PROMPT_TOKENS, 6000), cpt=st.floats(1.0, 8.0))
def test_prompt_counts_as_drawn(tokens: int, cpt: float) -> None:
    text = prompt_text(tokens, cpt, request_id=12)
    assert math.ceil(len(text) / cpt) + PROMPT_OVERHEAD_TOKENS == tokens


def scenario(**overrides: object) -> Scenario:
    tenant = {
        "key": "sk-test-acme-0001",
        "arrivals": [{"kind": "poisson", "rate_per_s": 20}],
        "prompt_tokens": {"kind": "uniform", "low": 1, "high": 400},
        "output_tokens": {"kind": "lognormal", "median": 300, "sigma": 1.0, "max": 4000},
        "max_tokens": {"kind": "fixed", "value": 512},
        "stream_share": 0.25,
        "slo": {"ttft_s": 1, "latency_s": 10},
    }
    base: dict[str, object] = {
        "name": "t",
        "description": "test",
        "seed": 5,
        "duration_s": 400,
        "max_requests": 20000,
        "tenants": {"acme": tenant, "globex": {**tenant, "key": "sk-test-globex-01"}},
    }
    return msgspec.convert(base | overrides, Scenario)


def test_plan_is_seeded_and_matches_the_configured_rate() -> None:
    sc = scenario()
    trace = plan(sc)
    assert trace == plan(sc)
    assert trace != plan(sc.with_seed(6))
    assert [p.id for p in trace] == list(range(len(trace)))
    assert [p.at_s for p in trace] == sorted(p.at_s for p in trace)
    for name in ("acme", "globex"):
        mine = [p for p in trace if p.tenant == name]
        assert within(len(mine), 20 * 400, math.sqrt(20 * 400))
        assert within(
            sum(p.stream for p in mine) / len(mine), 0.25, math.sqrt(0.25 * 0.75 / len(mine))
        )
    assert all(p.output_tokens <= p.max_tokens == 512 for p in trace)
    assert min(p.prompt_tokens for p in trace) == MIN_PROMPT_TOKENS


def shared(caching: bool = True, **tenant: object) -> Scenario:
    base = scenario()
    tenants = msgspec.to_builtins(base.tenants)
    tenants["acme"] |= tenant
    backend = {"prefix_caching": caching, "chars_per_token": 3.5}
    return msgspec.convert(
        msgspec.to_builtins(base) | {"tenants": tenants, "backend": backend}, Scenario
    )


def test_a_shared_prefix_adds_its_tokens_and_leaves_the_rest_of_the_trace_alone() -> None:
    plain, trace = plan(scenario()), plan(shared(shared_prefix_tokens=300, shared_prefixes=3))
    assert len(plain) == len(trace)
    for before, after in zip(plain, trace, strict=True):
        added = 300 if after.tenant == "acme" else 0
        assert after.shared_prefix_tokens == added
        assert (
            msgspec.structs.replace(
                after, prompt_tokens=after.prompt_tokens - added, shared_prefix_tokens=0, prefix=0
            )
            == before
        )
    prefixes = [p.prefix for p in trace if p.tenant == "acme"]
    for k in range(3):
        assert within(prefixes.count(k) / len(prefixes), 1 / 3, math.sqrt(2 / 9 / len(prefixes)))
    assert {p.prefix for p in trace if p.tenant == "globex"} == {0}


def test_shared_prefix_messages_count_as_drawn_and_share_only_the_system_prompt() -> None:
    sc = shared(shared_prefix_tokens=300, shared_prefixes=2)
    trace = [p for p in plan(sc) if p.tenant == "acme"][:40]
    by_prefix: dict[int, set[str]] = {0: set(), 1: set()}
    for item in trace:
        messages = chat_messages(item, 3.5)
        req = msgspec.convert({"model": "m", "messages": messages}, ChatRequest)
        assert count_prompt_tokens(req, 3.5) == item.prompt_tokens
        assert [m["role"] for m in messages] == ["system", "user"]
        by_prefix[item.prefix].add(messages[0]["content"])
    assert all(len(texts) == 1 for texts in by_prefix.values())
    assert by_prefix[0] != by_prefix[1]
    system = len(next(iter(by_prefix[0])))
    block = round(sc.backend.block_size * 3.5)
    chains = [(p, block_hashes(sc, p)) for p in trace]
    for (a, first), (b, second) in itertools.combinations(chains, 2):
        assert first is not None
        assert second is not None
        pairs = zip(first, second, strict=False)
        common = next(
            (i for i, (x, y) in enumerate(pairs) if x != y), min(map(len, (first, second)))
        )
        # the system prompt's full blocks, and never a block that reaches a request's own text
        assert common == (system // block if a.prefix == b.prefix else 0)
    assert block_hashes(shared(False, shared_prefix_tokens=300), trace[0]) is None


def test_a_shared_prefix_needs_room_for_its_framing() -> None:
    with pytest.raises(msgspec.ValidationError, match="at least 5"):
        shared(shared_prefix_tokens=4)


def test_plan_refuses_more_than_max_requests() -> None:
    with pytest.raises(TraceTooLarge, match="max_requests"):
        plan(scenario(max_requests=100))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"])
def test_loopback_targets_pass(url: str) -> None:
    check_loopback(url)


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "https://api.openai.com", "http://0.0.0.0"]
)
def test_other_targets_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        check_loopback(url)


# --- retries -------------------------------------------------------------------------------


def attempt(status: int, retry_after: float | None = None, should: bool | None = None) -> Attempt:
    result = Result.RATE_LIMITED if status == 429 else Result.SHED
    return Attempt(
        status=status, result=result, done_s=0, retry_after_s=retry_after, should_retry=should
    )


def test_retry_honours_retry_after_and_x_should_retry() -> None:
    spec = RetrySpec(max_retries=2, max_wait_s=10, backoff_s=0.5)
    assert retry_wait_s(spec, 0, attempt(429, 3.0)) == 3.0
    assert retry_wait_s(spec, 1, attempt(503)) == 1.0  # backoff doubles
    assert retry_wait_s(spec, 2, attempt(429, 1.0)) is None  # out of retries
    assert retry_wait_s(spec, 0, attempt(429, 30.0)) is None  # longer than the client waits
    assert retry_wait_s(spec, 0, attempt(429, 1.0, should=False)) is None
    assert retry_wait_s(spec, 0, attempt(400, should=True)) == 0.5
    assert (
        retry_wait_s(RetrySpec(max_retries=1, honour_retry_after=False), 0, attempt(429, 9)) == 0.5
    )
    assert retry_wait_s(RetrySpec(), 0, attempt(429, 1.0)) is None  # no retries configured


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


# --- the client against a scripted server --------------------------------------------------


class Scripted:
    """A chat server whose answer depends on the API key."""

    def __init__(self) -> None:
        self.limited_once = False
        self.never = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = request.headers["Authorization"].removeprefix("Bearer ")
        if key == "sk-test-limited" and not self.limited_once:
            self.limited_once = True
            error = {"error": {"message": "slow down", "type": "rate_limited"}}
            return web.json_response(error, status=429, headers={"retry-after-ms": "50"})
        if key == "sk-test-oom":
            error = {"error": {"message": "CUDA out of memory", "type": "oom"}}
            return web.json_response(error, status=500)
        if key == "sk-test-hang":
            await self.never.wait()
        return await answer(request, key, body)


async def answer(request: web.Request, key: str, body: dict[str, object]) -> web.StreamResponse:
    usage = {"prompt_tokens": 20, "completion_tokens": body["sim_output_tokens"]}
    if not body["stream"]:
        return web.json_response({"choices": [{"message": {"content": "hi"}}], "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    chunks = [{"choices": [{"delta": {"role": "assistant"}}]}]
    chunks += [{"choices": [{"delta": {"content": "x"}}]}] * 3
    for chunk in chunks:
        await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    if key == "sk-test-cut":
        return resp
    await resp.write(b"data: " + msgspec.json.encode({"choices": [], "usage": usage}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture
async def scripted() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", Scripted().chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/"))
    await server.close()


async def test_records_follow_the_answers(scripted: str) -> None:
    def tenant(key: str, stream: float, retries: int = 0) -> dict[str, object]:
        return {
            "key": key,
            "arrivals": [{"kind": "constant", "rate_per_s": 1, "end_s": 1}],
            "prompt_tokens": {"kind": "fixed", "value": 100},
            "output_tokens": {"kind": "fixed", "value": 7},
            "max_tokens": {"kind": "fixed", "value": 64},
            "stream_share": stream,
            "slo": {"ttft_s": 30, "latency_s": 30},
            "retry": {"max_retries": retries},
        }

    sc = scenario(
        duration_s=1,
        drain_timeout_s=2,
        tenants={
            "stream": tenant("sk-test-stream", 1),
            "plain": tenant("sk-test-plain", 0),
            "limited": tenant("sk-test-limited", 0, retries=1),
            "oom": tenant("sk-test-oom", 0),
            "cut": tenant("sk-test-cut", 1),
            "hang": tenant("sk-test-hang", 0),
        },
    )
    records = await run_trace(sc, plan(sc), scripted, progress=None)
    by: dict[str, RequestRecord] = {r.tenant: r for r in records}
    assert len(records) == 6
    assert by["stream"].result is Result.OK
    assert by["stream"].output_tokens == 7
    assert by["stream"].ttft_s is not None
    assert by["stream"].latency_s is not None
    assert by["stream"].ttft_s <= by["stream"].latency_s
    assert by["plain"].result is Result.OK
    assert by["plain"].ttft_s is None
    assert by["plain"].within_slo()
    limited = by["limited"]
    assert (limited.result, limited.retries, limited.attempt_statuses) == (Result.OK, 1, [429, 200])
    assert (limited.retry_after_s, limited.retry_after_honoured) == (0.05, True)
    assert (by["oom"].result, by["oom"].status, by["oom"].error_type) == (Result.OOM, 500, "oom")
    assert by["cut"].result is Result.STREAM_ERROR
    assert by["hang"].result is Result.UNFINISHED
    assert by["hang"].done_s is None


# --- one short run against the real simulator ----------------------------------------------


def test_run_against_a_real_simulator(tmp_path: Path) -> None:
    scenario_file = tmp_path / "small.yaml"
    scenario_file.write_text(
        """
name: small
description: a few seconds against a fast simulator
seed: 1
duration_s: 3
drain_timeout_s: 10
backend: {kv_blocks: 256, time_scale: 20.0}
tenants:
  acme:
    key: sk-test-acme-0001
    arrivals: [{kind: poisson, rate_per_s: 10}]
    prompt_tokens: {kind: uniform, low: 20, high: 200}
    output_tokens: {kind: uniform, low: 5, high: 40}
    max_tokens: {kind: fixed, value: 64}
    stream_share: 0.5
    slo: {ttft_s: 5, latency_s: 10}
"""
    )
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "gateway.sim", "--host", "127.0.0.1", "--port", str(port),
         "--kv-blocks", "256", "--time-scale", "20"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_listening(url + "/health")
        code = main(["run", str(scenario_file), "--target", url, "--out", str(tmp_path / "out"),
                     "--sim-url", url])  # fmt: skip
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    assert code == 0
    records = read_jsonl(tmp_path / "out" / "records-run.jsonl", RequestRecord)
    planned = plan(msgspec.convert(yaml.safe_load(scenario_file.read_text()), Scenario))
    assert len(records) == len(planned) > 0
    assert all(r.result is Result.OK for r in records)
    assert [r.prompt_tokens for r in records] == [p.prompt_tokens for p in planned]
    assert [r.output_tokens for r in records] == [p.output_tokens for p in planned]
    assert (tmp_path / "out" / "summary.json").exists()


def _wait_listening(url: str) -> None:
    for _ in range(200):
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening at {url}")
