"""Issue 3's "done when", measured: a tenant limited to N tokens/min is admitted about N tokens a
minute under a mixed load (not N requests), and a tenant limited to 2 GiB·s/s of
``kv_gib_seconds`` holds about 2 GiB of KV cache on average.

python -m loadtest.limits_check [--seed N | --seeds N,M,...] [--duration S] [--warmup S]
    [--wait] [--scale K] --out DIR

One kvgate in front of two simulated GPUs (paged, 16 GiB of KV each, far from saturated): each
tenant sends to its own model on its own GPU, so the second GPU's own time integral of KV blocks
held is that tenant's real KV memory. Both tenants offer about 2.5x their limit with prompts of
100-8000 tokens, outputs of 20-1000 and ``max_tokens`` of 1000-1200, and retry 429s after
``Retry-After``. Rates are measured over the steady window ``[warmup, duration)``; the warm-up
holds the initial full bucket and everything it admitted, which has settled by then. With
``--wait`` the token limit lets a request wait for its turn; issue 10's aim is then that large
requests (prompts of ``LARGE_PROMPT`` or more) get a share of the tokens they ask for within 10%
of the small ones' share (``large_to_small``, over the whole run). A share is a count of
requests served out of a few hundred, so one run at the default size moves by several percent
with a handful of requests; ``--scale K`` multiplies the tokens tenant's limit, burst, arrival
rate and GPU by K (the same sizes, overload and waits, K times the requests), and ``--seeds``
runs one seed after another and prints every run's figures and their medians (``summary.json``).
A measurement, not a test: the exit code is 0 whether or not an aim is met.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import sys
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path

import aiohttp
import msgspec
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim.config import SimConfig
from loadtest.compare import sampler
from loadtest.generator import Extra, PlannedRequest, plan, run_trace
from loadtest.records import BackendSample, RequestRecord, Result, write_jsonl
from loadtest.scenario import (
    Component,
    LogNormal,
    Mixture,
    Poisson,
    RetrySpec,
    Scenario,
    Slo,
    TenantSpec,
    Uniform,
)
from loadtest.targets import Process, free_port, key_hash, simulator

GIB = float(1 << 30)
TOKENS, KV = "tenant-tokens", "tenant-kv"
MODELS = {TOKENS: "llama-3.1-8b-tokens", KV: "llama-3.1-8b-kv"}
KEYS = {TOKENS: "sk-limits-tokens-01", KV: "sk-limits-kv-0002"}
TOKENS_PER_MIN = 240_000.0
TOKENS_BURST = 16_000.0
KV_GIB_S_PER_S = 2.0
KV_BURST = 20.0
LARGE_PROMPT = 2000  # prompts of the large component are at least this long
MAX_PROMPT, MAX_MAX_TOKENS = 8000, 1200
TOLERANCE = {TOKENS: 0.05, KV: 0.10}
LARGE_TO_SMALL_TOLERANCE = 0.10  # issue 10: large requests' share within 10% of small ones'
SIM = SimConfig(
    kv_blocks=8192,  # 16 GiB: 128k tokens, several times what both tenants hold
    max_num_seqs=256,
    prefill_tokens_per_s=8000.0,
    decode_step_s=0.02,
    step_per_seq_s=0.0002,
    time_scale=2.0,
)
TYPICAL_BATCH = 16  # sequences per step assumed by the policy's decode speed


def decode_tokens_per_s(sim: SimConfig, batch: float = TYPICAL_BATCH) -> float:
    """Per-sequence output tokens per wall second at ``batch``: the policy's ``speed``."""
    return sim.time_scale / (sim.decode_step_s + sim.step_per_seq_s * batch)


def sim_for(name: str, scale: float = 1.0) -> SimConfig:
    """The tenant's simulated GPU. The tokens tenant's is ``scale`` times SIM (prefill speed,
    KV blocks, sequences, and a step that grows ``scale`` times slower with the batch), so it is
    as loaded by ``scale`` times the traffic, and its requests last as long."""
    if name != TOKENS or scale == 1.0:
        return SIM
    return msgspec.structs.replace(
        SIM,
        prefill_tokens_per_s=SIM.prefill_tokens_per_s * scale,
        kv_blocks=round(SIM.kv_blocks * scale),
        max_num_seqs=round(SIM.max_num_seqs * scale),
        step_per_seq_s=SIM.step_per_seq_s / scale,
    )


def burst_note(scale: float = 1.0) -> str:
    """Why the bursts are what they are: each must hold the largest request's reservation (or
    that request could never pass) with room to spare, and be small beside a minute's rate."""
    largest_tokens = MAX_PROMPT + MAX_MAX_TOKENS
    largest_kv = (
        kv_bytes(largest_tokens, SIM)
        / GIB
        * (
            MAX_PROMPT / (SIM.prefill_tokens_per_s * SIM.time_scale)
            + MAX_MAX_TOKENS / decode_tokens_per_s(SIM)
        )
    )
    burst = TOKENS_BURST * scale
    return (
        f"tokens {burst:.0f} = {burst / largest_tokens:.1f}x the largest "
        f"reservation ({largest_tokens}) and {TOKENS_BURST / TOKENS_PER_MIN * 60:.0f} s of "
        f"refill; kv {KV_BURST:g} GiB·s = {KV_BURST / largest_kv:.2f}x the largest estimate "
        f"({largest_kv:.1f}) and {KV_BURST / KV_GIB_S_PER_S:.0f} s of refill"
    )


def tenant_spec(name: str, rate_per_s: float, stream_share: float) -> TenantSpec:
    small = Component(weight=0.7, size=Uniform(low=100, high=LARGE_PROMPT - 1000))
    large = Component(weight=0.3, size=Uniform(low=LARGE_PROMPT, high=MAX_PROMPT))
    return TenantSpec(
        key=KEYS[name],
        arrivals=[Poisson(rate_per_s=rate_per_s)],
        prompt_tokens=Mixture(components=[small, large]),
        output_tokens=LogNormal(median=150, sigma=0.9, min=20, max=1000),
        max_tokens=Uniform(low=1000, high=MAX_MAX_TOKENS),
        stream_share=stream_share,
        slo=Slo(ttft_s=5.0, latency_s=30.0),
        retry=RetrySpec(max_retries=10, max_wait_s=30.0),
    )


def scenarios(seed: int, duration_s: float, scale: float = 1.0) -> dict[str, Scenario]:
    """One scenario per tenant (the generator sends one model per scenario). Arrival rates
    offer about 2.5x each limit: ~2100 real tokens a request for the tokens tenant, ~0.75 GiB·s
    a request for the KV tenant at this simulator's speed. The KV tenant streams every request
    so its records show when decoding began. The tokens tenant sends ``scale`` times as many."""
    specs = {TOKENS: tenant_spec(TOKENS, 4.8 * scale, 0.5), KV: tenant_spec(KV, 6.8, 1.0)}
    return {
        name: Scenario(
            name=f"limits-{name}",
            description="issue 3: limits in tokens and GiB·s",
            seed=seed,
            duration_s=duration_s,
            drain_timeout_s=5.0,
            max_requests=100_000,
            backend=msgspec.structs.replace(sim_for(name, scale), model=MODELS[name], seed=seed),
            tenants={name: spec},
        )
        for name, spec in specs.items()
    }


def policy(
    sim_urls: dict[str, str],
    port: int,
    admin_port: int = 9464,
    *,
    wait: bool = False,
    scale: float = 1.0,
) -> dict[str, object]:
    """The gateway's policy: one model (and GPU) per tenant, one limit per tenant."""
    sims = {name: sim_for(name, scale) for name in sim_urls}
    batches = {name: TYPICAL_BATCH * (scale if name == TOKENS else 1.0) for name in sim_urls}
    models = {
        MODELS[name]: {
            "kv": {"layers": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bf16"},
            "context": 16384,
            "default_max_tokens": 1024,
            "speed": {
                "prefill_tokens_per_s": sims[name].prefill_tokens_per_s * sims[name].time_scale,
                "decode_tokens_per_s": round(decode_tokens_per_s(sims[name], batches[name]), 1),
            },
            "backends": [
                {
                    "url": url,
                    "kv_capacity": (
                        f"{sims[name].kv_blocks * SIM.block_size * SIM.kv_bytes_per_token}"
                    ),
                    "signals": "vllm",
                    "memory": "paged",
                    "warmup": "0s",
                    "probe_interval": "500ms",
                }
            ],
        }
        for name, url in sim_urls.items()
    }
    limits = {
        TOKENS: {
            "unit": "tokens",
            "rate": f"{TOKENS_PER_MIN * scale:.0f}/min",
            "burst": TOKENS_BURST * scale,
            "wait": wait,
        },
        KV: {"unit": "kv_gib_seconds", "rate": f"{KV_GIB_S_PER_S:g}/s", "burst": KV_BURST},
    }
    tenants = {
        name: {"keys": [key_hash(KEYS[name])], "limits": [limit]} for name, limit in limits.items()
    }
    return {
        "version": 1,
        "server": {"host": "127.0.0.1", "port": port, "admin": {"port": admin_port}},
        "store": {"kind": "memory"},
        "models": models,
        "tenants": tenants,
        "admission": {"queue": {"max_wait": "10s"}},
    }


# --- pure measurement -------------------------------------------------------------------------

Series = Sequence[tuple[float, float]]  # (t_s, cumulative value), t_s increasing


def value_at(series: Series, t: float) -> float | None:
    """The cumulative value at ``t``, linear between samples; None outside the sampled span."""
    if not series or not series[0][0] <= t <= series[-1][0]:
        return None
    i = bisect.bisect_left([s[0] for s in series], t)
    t1, v1 = series[i]
    if t1 == t or i == 0:
        return v1
    t0, v0 = series[i - 1]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def rate(series: Series, start_s: float, end_s: float) -> float | None:
    """Increase per second of a cumulative series from ``start_s`` to ``end_s``."""
    v0, v1 = value_at(series, start_s), value_at(series, end_s)
    if v0 is None or v1 is None or end_s <= start_s:
        return None
    return (v1 - v0) / (end_s - start_s)


def fitted_rate(series: Series, start_s: float, end_s: float) -> float | None:
    """Least-squares slope of the samples in [start_s, end_s]: a rate that, unlike ``rate``,
    does not hang on what happened to be in flight at the two ends."""
    inside = [(t, v) for t, v in series if start_s <= t <= end_s]
    if len(inside) < 2:
        return None
    mean_t = sum(t for t, _ in inside) / len(inside)
    mean_v = sum(v for _, v in inside) / len(inside)
    spread = sum((t - mean_t) ** 2 for t, _ in inside)
    if spread == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in inside) / spread


def tokens_per_min(records: Sequence[RequestRecord], start_s: float, end_s: float) -> float:
    """Prompt plus output tokens (from the responses' usage) of the successful requests that
    ended in [start_s, end_s), per minute: when they settled in the gateway's buckets."""
    total = sum(
        (r.prompt_tokens or 0) + (r.output_tokens or 0)
        for r in records
        if r.result is Result.OK and r.done_s is not None and start_s <= r.done_s < end_s
    )
    return total * 60.0 / (end_s - start_s)


def kv_bytes(tokens: int, sim: SimConfig) -> int:
    """Bytes of the whole blocks that hold ``tokens``."""
    return -(-tokens // sim.block_size) * sim.block_size * sim.kv_bytes_per_token


def kv_held_from_records(
    records: Sequence[RequestRecord], start_s: float, end_s: float, sim: SimConfig, *, growing: bool
) -> float:
    """Average KV bytes held over [start_s, end_s) by the successful streamed requests.

    A request's span runs from its prefill to its last byte: the records keep its first token
    but not when a retried request's last attempt began, so the span starts at the first token
    less the prompt's prefill time at the simulator's speed. ``growing=False`` counts as the
    gateway's GiB·s does: the blocks of prompt + output for the whole span. ``growing=True``
    counts as a paged GPU holds them: the prompt's blocks while prefilling, then blocks that
    grow with the tokens written, one a step, spread evenly over the decoding time."""
    prefill_per_s = sim.prefill_tokens_per_s * sim.time_scale
    held = 0.0
    for r in records:
        if r.result is not Result.OK or r.first_token_s is None or r.done_s is None:
            continue
        prompt, output = r.prompt_tokens or 0, r.output_tokens or 0
        begin, first, done = r.first_token_s - prompt / prefill_per_s, r.first_token_s, r.done_s
        if not growing:
            held += kv_bytes(prompt + output, sim) * _overlap(begin, done, start_s, end_s)
            continue
        held += kv_bytes(prompt, sim) * _overlap(begin, first, start_s, end_s)
        # Tokens 2..n come out of steps that hold the prompt plus 1..n-1 written tokens.
        written = range(1, max(2, output))
        mean = sum(kv_bytes(prompt + k, sim) for k in written) / len(written)
        held += mean * _overlap(first, done, start_s, end_s)
    return held / (end_s - start_s)


def _overlap(begin: float, end: float, start_s: float, end_s: float) -> float:
    return max(0.0, min(end, end_s) - max(begin, start_s))


def _number(stats: Mapping[str, object], key: str) -> float | None:
    value = stats.get(key)
    return float(value) if isinstance(value, float | int) else None


def sim_kv_held(
    samples: Sequence[BackendSample], start_s: float, end_s: float, sim: SimConfig
) -> float | None:
    """Average KV bytes the simulated GPU held over [start_s, end_s] (run time, wall seconds),
    from its own time integral of blocks held: ``kv_utilisation_avg`` x serving seconds."""
    held: list[tuple[float, float]] = []
    serving: list[tuple[float, float]] = []
    for s in samples:
        now, loading = _number(s.stats, "now_s"), _number(s.stats, "loading_s")
        used = _number(s.stats, "kv_utilisation_avg")
        if now is not None and loading is not None and used is not None:
            held.append((s.t_s, used * (now - loading)))
            serving.append((s.t_s, now - loading))
    h0, h1 = value_at(held, start_s), value_at(held, end_s)
    s0, s1 = value_at(serving, start_s), value_at(serving, end_s)
    if h0 is None or h1 is None or s0 is None or s1 is None or s1 <= s0:
        return None
    return (h1 - h0) / (s1 - s0) * sim.kv_blocks * sim.block_size * sim.kv_bytes_per_token


def offered_per_min(planned: Sequence[PlannedRequest], start_s: float, end_s: float) -> float:
    """Tokens (prompt plus real output) of the requests scheduled in the window, per minute."""
    inside = [p for p in planned if start_s <= p.at_s < end_s]
    return sum(p.prompt_tokens + p.output_tokens for p in inside) * 60.0 / (end_s - start_s)


def offered_gib_s_per_s(
    planned: Sequence[PlannedRequest], start_s: float, end_s: float, sim: SimConfig
) -> float:
    """GiB·s per second of the requests scheduled in the window, each at its real size and
    its duration at the policy's speed (an estimate: the real step time depends on the batch)."""
    decode, prefill = decode_tokens_per_s(sim), sim.prefill_tokens_per_s * sim.time_scale
    total = 0.0
    for p in planned:
        if start_s <= p.at_s < end_s:
            size = kv_bytes(p.prompt_tokens + p.output_tokens, sim)
            total += size / GIB * (p.prompt_tokens / prefill + p.output_tokens / decode)
    return total / (end_s - start_s)


def verdict(measured: float | None, target: float, tolerance: float) -> bool:
    return measured is not None and abs(measured / target - 1.0) <= tolerance


# --- the run ----------------------------------------------------------------------------------


def scraper(gateway_url: str, into: dict[str, list[tuple[float, float]]]) -> Extra:
    """Every second: the tokens tenant's settled tokens (input + output) and the KV tenant's
    settled GiB·s, from the gateway's /metrics, at run time t."""

    async def scrape(t0: float) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(gateway_url + "/metrics") as resp:
                        text = await resp.text()
                    t = loop.time() - t0
                    into[TOKENS].append((t, settled(text, "kvgate_tokens_total", TOKENS)))
                    byte_s = settled(text, "kvgate_kv_byte_seconds_total", KV)
                    into[KV].append((t, byte_s / GIB))
                await asyncio.sleep(1.0)

    return scrape


def settled(exposition: str, sample: str, tenant: str) -> float:
    """Sum of ``sample`` over every label set of ``tenant`` in a Prometheus text exposition."""
    return sum(
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == sample and s.labels.get("tenant") == tenant
    )


def outcomes(exposition: str) -> dict[str, dict[str, int]]:
    """``kvgate_requests_total`` by tenant and outcome."""
    out: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == "kvgate_requests_total" and s.labels.get("tenant") in MODELS:
                counts = out.setdefault(s.labels["tenant"], {})
                outcome = s.labels["outcome"]  # summed over the status label
                counts[outcome] = counts.get(outcome, 0) + int(s.value)
    return out


class Run(msgspec.Struct, kw_only=True):
    records: dict[str, list[RequestRecord]]
    sims: dict[str, list[BackendSample]]
    counters: dict[str, list[tuple[float, float]]]
    outcomes: dict[str, dict[str, int]]


async def run(
    scens: dict[str, Scenario], out: Path, *, wait: bool = False, scale: float = 1.0
) -> Run:
    """Start both simulators and the gateway, fire both traces at once, stop everything."""
    counters: dict[str, list[tuple[float, float]]] = {TOKENS: [], KV: []}
    sims: dict[str, list[BackendSample]] = {TOKENS: [], KV: []}
    async with contextlib.AsyncExitStack() as stack:
        urls = {
            name: await stack.enter_async_context(
                simulator(s.backend, out, name, "ready", free_port())
            )
            for name, s in scens.items()
        }
        port, admin_port = free_port(), free_port()
        policy_path = out / "policy.yaml"
        written = policy(urls, port, admin_port, wait=wait, scale=scale)
        policy_path.write_text(yaml.safe_dump(written, sort_keys=False))
        args = [sys.executable, "-m", "gateway", "run", "-c", str(policy_path)]
        gateway = await Process.start("gateway", args, out / "gateway.log")
        stack.push_async_callback(gateway.stop)
        url = f"http://127.0.0.1:{port}"
        await gateway.wait_http(url + "/readyz", frozenset({200}))
        # The extras ride on the first trace: its t0 is the clock of every sample.
        admin_url = f"http://127.0.0.1:{admin_port}"  # /metrics is on the admin listener
        extras = [scraper(admin_url, counters), *(sampler(urls[n], sims[n]) for n in scens)]
        first, second = scens[TOKENS], scens[KV]
        tokens_records, kv_records = await asyncio.gather(
            run_trace(first, plan(first), url, extras=extras, progress_every_s=10.0),
            run_trace(second, plan(second), url, progress=None),
        )
        async with (
            aiohttp.ClientSession() as session,
            session.get(admin_url + "/metrics") as resp,
        ):
            final = outcomes(await resp.text())
    return Run(
        records={TOKENS: tokens_records, KV: kv_records},
        sims=sims,
        counters=counters,
        outcomes=final,
    )


# --- results ----------------------------------------------------------------------------------


class Requests(msgspec.Struct, kw_only=True):
    offered_small: int
    offered_large: int
    ok_small: int
    ok_large: int
    ok_tokens_large_share: float  # of the tokens of successful requests, those of large ones
    served_small: float  # of the small requests' offered tokens, the share served (ok)
    served_large: float  # the same for the large requests
    large_to_small: float | None  # served_large / served_small: 1.0 is an equal share
    mean_attempts: float
    ok_at_first: float  # of the successful requests, the share that passed at their first attempt
    retry_ok: float | None  # of the first retries after a 429, the share that passed
    results: dict[str, int]


class TokensResult(msgspec.Struct, kw_only=True):
    limit_per_min: float
    burst: float
    offered_per_min: float
    gateway_per_min: float | None  # kvgate_tokens_total, its increase over the window
    gateway_fit_per_min: float | None  # the same counter, least-squares slope in the window
    records_per_min: float  # usage of the successful requests that ended in the window
    warmup_per_min: float | None  # the counter before the window, burst included
    aim_met: bool


class KvResult(msgspec.Struct, kw_only=True):
    limit_gib_s_per_s: float
    burst_gib_s: float
    offered_gib_s_per_s: float
    gateway_gib: float | None  # kvgate_kv_byte_seconds_total in GiB, its increase / window seconds
    gateway_fit_gib: float | None  # the same counter, least-squares slope in the window
    records_gib: float  # the records, counted as the gateway counts (final size, whole span)
    records_growing_gib: float  # the records, counted as a paged GPU holds KV (growing)
    backend_gib: float | None  # the tenant's own simulated GPU: its blocks held, time average
    aim_met_gateway: bool
    aim_met_backend: bool


class LimitsCheck(msgspec.Struct, kw_only=True):
    seed: int
    scale: float
    duration_s: float
    window_s: tuple[float, float]
    burst_note: str
    tokens: TokensResult
    kv: KvResult
    requests: dict[str, Requests]
    gateway_outcomes: dict[str, dict[str, int]]
    sim_max_lag_s: dict[str, float | None]  # simulated seconds a simulator fell behind


def requests_summary(
    planned: Sequence[PlannedRequest], records: Sequence[RequestRecord]
) -> Requests:
    ok = [r for r in records if r.result is Result.OK]
    tokens = [(r.prompt_tokens or 0) + (r.output_tokens or 0) for r in ok]
    large = [t for r, t in zip(ok, tokens, strict=True) if r.planned_prompt_tokens >= LARGE_PROMPT]
    attempts = [len(r.attempt_statuses) for r in records if r.attempt_statuses]
    served = {big: _served(records, big) for big in (False, True)}
    return Requests(
        offered_small=sum(p.prompt_tokens < LARGE_PROMPT for p in planned),
        offered_large=sum(p.prompt_tokens >= LARGE_PROMPT for p in planned),
        ok_small=len(ok) - len(large),
        ok_large=len(large),
        ok_tokens_large_share=sum(large) / sum(tokens) if tokens else 0.0,
        served_small=served[False],
        served_large=served[True],
        large_to_small=served[True] / served[False] if served[False] else None,
        mean_attempts=sum(attempts) / len(attempts) if attempts else 0.0,
        ok_at_first=sum(len(r.attempt_statuses) == 1 for r in ok) / len(ok) if ok else 0.0,
        retry_ok=_retry_ok(records),
        results=dict(Counter(r.result.value for r in records)),
    )


def _retry_ok(records: Sequence[RequestRecord]) -> float | None:
    """Of the requests that came back after a 429, the share whose first retry passed: how
    often the ``Retry-After`` a refused client was told held."""
    retried = [
        r.attempt_statuses[1]
        for r in records
        if len(r.attempt_statuses) > 1 and r.attempt_statuses[0] == 429
    ]
    return sum(status == 200 for status in retried) / len(retried) if retried else None


def _served(records: Sequence[RequestRecord], large: bool) -> float:
    """Of the planned tokens (prompt plus real output) of the small or ``large`` requests, the
    share that the successful ones carried: a class's share of the tokens it asked for."""
    mine = [r for r in records if (r.planned_prompt_tokens >= LARGE_PROMPT) == large]
    offered = sum(r.planned_prompt_tokens + r.planned_output_tokens for r in mine)
    ok = sum(
        r.planned_prompt_tokens + r.planned_output_tokens for r in mine if r.result is Result.OK
    )
    return ok / offered if offered else 0.0


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def summarise(
    result: Run, scens: dict[str, Scenario], warmup_s: float, scale: float = 1.0
) -> LimitsCheck:
    start, end = warmup_s, scens[TOKENS].duration_s
    planned = {name: plan(s) for name, s in scens.items()}
    tok, kv = result.counters[TOKENS], result.counters[KV]
    backend = _scaled(sim_kv_held(result.sims[KV], start, end, SIM), 1.0 / GIB)
    kv_records = result.records[KV]
    limit_per_min = TOKENS_PER_MIN * scale
    return LimitsCheck(
        seed=scens[TOKENS].seed,
        scale=scale,
        duration_s=end,
        window_s=(start, end),
        burst_note=burst_note(scale),
        tokens=TokensResult(
            limit_per_min=limit_per_min,
            burst=TOKENS_BURST * scale,
            offered_per_min=offered_per_min(planned[TOKENS], start, end),
            gateway_per_min=_scaled(rate(tok, start, end), 60.0),
            gateway_fit_per_min=_scaled(fitted_rate(tok, start, end), 60.0),
            records_per_min=tokens_per_min(result.records[TOKENS], start, end),
            warmup_per_min=_scaled(rate(tok, tok[0][0], start), 60.0) if tok else None,
            aim_met=verdict(rate(tok, start, end), limit_per_min / 60.0, TOLERANCE[TOKENS]),
        ),
        kv=KvResult(
            limit_gib_s_per_s=KV_GIB_S_PER_S,
            burst_gib_s=KV_BURST,
            offered_gib_s_per_s=offered_gib_s_per_s(planned[KV], start, end, SIM),
            gateway_gib=rate(kv, start, end),
            gateway_fit_gib=fitted_rate(kv, start, end),
            records_gib=kv_held_from_records(kv_records, start, end, SIM, growing=False) / GIB,
            records_growing_gib=(
                kv_held_from_records(kv_records, start, end, SIM, growing=True) / GIB
            ),
            backend_gib=backend,
            aim_met_gateway=verdict(rate(kv, start, end), KV_GIB_S_PER_S, TOLERANCE[KV]),
            aim_met_backend=verdict(backend, KV_GIB_S_PER_S, TOLERANCE[KV]),
        ),
        requests={n: requests_summary(planned[n], result.records[n]) for n in scens},
        gateway_outcomes=result.outcomes,
        sim_max_lag_s={
            name: _number(samples[-1].stats, "max_lag_s") if samples else None
            for name, samples in result.sims.items()
        },
    )


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render(check: LimitsCheck) -> str:
    t, k = check.tokens, check.kv
    start, end = check.window_s
    met = {True: "aim MET", False: "aim MISSED"}
    lines = [
        f"limits check: seed {check.seed}, scale {check.scale:g}, run {check.duration_s:g} s, "
        "steady window "
        f"{start:g}-{end:g} s (the first {start:g} s hold the initial burst and its settling)",
        f"bursts: {check.burst_note}",
        f"(a) {TOKENS}: limit {t.limit_per_min:,.0f} tokens/min, aim ±{TOLERANCE[TOKENS]:.0%}",
    ]

    def row(label: str, value: float | None, target: float, digits: int, note: str = "") -> None:
        ratio = "" if value is None else f"{value / target:.3f}x"
        lines.append(f"  {label:<44}{_num(value, digits):>12}  {ratio:>7}  {note}")

    n = t.limit_per_min
    row("offered tokens/min", t.offered_per_min, n, 0)
    row("admitted: gateway counter, window delta", t.gateway_per_min, n, 0, met[t.aim_met])
    row("admitted: gateway counter, fitted slope", t.gateway_fit_per_min, n, 0)
    row("admitted: client records, by end time", t.records_per_min, n, 0)
    row(f"warm-up 0-{start:g} s, burst included", t.warmup_per_min, n, 0, "(excluded)")
    lines.append(
        f"(b) {KV}: limit {k.limit_gib_s_per_s:g} GiB·s/s (average GiB held), "
        f"aim ±{TOLERANCE[KV]:.0%}"
    )
    g = k.limit_gib_s_per_s
    row("offered GiB·s/s (estimate)", k.offered_gib_s_per_s, g, 2)
    row("gateway counter, window delta", k.gateway_gib, g, 3, met[k.aim_met_gateway])
    row("gateway counter, fitted slope", k.gateway_fit_gib, g, 3)
    row("client records, final KV x span", k.records_gib, g, 3)
    row("client records, growing KV (paged)", k.records_growing_gib, g, 3)
    row("its simulated GPU, blocks held", k.backend_gib, g, 3, met[k.aim_met_backend])
    for name, req in check.requests.items():
        ratio = "n/a" if req.large_to_small is None else f"{req.large_to_small:.2f}x"
        answered = check.gateway_outcomes.get(name, {}).get("rate_limited", 0)
        lines.append(
            f"{name}: ok small {req.ok_small}/{req.offered_small}, large "
            f"{req.ok_large}/{req.offered_large} ({req.ok_tokens_large_share:.0%} of ok tokens), "
            f"{req.mean_attempts:.1f} attempts a request; {req.results}; ok at the first "
            f"attempt {req.ok_at_first:.0%}, first retries after a 429 that passed "
            f"{'n/a' if req.retry_ok is None else f'{req.retry_ok:.0%}'}"
        )
        lines.append(
            f"  share of offered tokens served: small {req.served_small:.1%}, large "
            f"{req.served_large:.1%} (large/small {ratio}); 429s answered: {answered}"
        )
    lags = ", ".join(f"{n} {_num(lag)}" for n, lag in check.sim_max_lag_s.items())
    lines.append(f"simulator max lag (simulated s): {lags}")
    return "\n".join(lines)


class RunFigures(msgspec.Struct, kw_only=True):
    """One run's figures for issue 10: the tokens tenant's shares, and the 429s it was sent."""

    seed: int
    large_to_small: float | None
    served_small: float
    served_large: float
    ok_small: int
    ok_large: int
    offered_small: int
    offered_large: int
    rate_limited: int  # 429s the gateway answered the tokens tenant (kvgate_requests_total)
    limit_ratio: float | None  # admitted tokens over the limit, in the steady window
    aim_met: bool  # large_to_small within LARGE_TO_SMALL_TOLERANCE of 1


class Summary(msgspec.Struct, kw_only=True):
    runs: list[RunFigures]
    median_large_to_small: float | None
    median_rate_limited: float
    aim_met_every_run: bool


def _median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def figures(check: LimitsCheck) -> RunFigures:
    req = check.requests[TOKENS]
    ratio = req.large_to_small
    admitted = check.tokens.gateway_per_min
    return RunFigures(
        seed=check.seed,
        large_to_small=ratio,
        served_small=req.served_small,
        served_large=req.served_large,
        ok_small=req.ok_small,
        ok_large=req.ok_large,
        offered_small=req.offered_small,
        offered_large=req.offered_large,
        rate_limited=check.gateway_outcomes.get(TOKENS, {}).get("rate_limited", 0),
        limit_ratio=None if admitted is None else admitted / check.tokens.limit_per_min,
        aim_met=ratio is not None and abs(ratio - 1.0) <= LARGE_TO_SMALL_TOLERANCE,
    )


def summary(checks: Sequence[LimitsCheck]) -> Summary:
    """Every run's figures and their medians: the aim holds only if it holds in every run."""
    runs = [figures(check) for check in checks]
    ratios = [r.large_to_small for r in runs if r.large_to_small is not None]
    return Summary(
        runs=runs,
        median_large_to_small=_median(ratios),
        median_rate_limited=_median([float(r.rate_limited) for r in runs]) or 0.0,
        aim_met_every_run=bool(runs) and all(r.aim_met for r in runs),
    )


def render_summary(result: Summary) -> str:
    lines = [
        f"{TOKENS}, per run: seed, large/small share (aim ±{LARGE_TO_SMALL_TOLERANCE:.0%}), "
        "small and large served, 429s answered, admitted/limit"
    ]
    for r in result.runs:
        ratio = "n/a" if r.large_to_small is None else f"{r.large_to_small:.3f}x"
        lines.append(
            f"  seed {r.seed}: {ratio} ({'met' if r.aim_met else 'MISSED'}), small "
            f"{r.served_small:.1%} ({r.ok_small}/{r.offered_small}), large {r.served_large:.1%} "
            f"({r.ok_large}/{r.offered_large}), 429s {r.rate_limited}, limit "
            f"{_num(r.limit_ratio)}x"
        )
    median = result.median_large_to_small
    lines.append(
        f"  median: {'n/a' if median is None else f'{median:.3f}x'}, 429s "
        f"{result.median_rate_limited:.0f}; aim "
        f"{'MET in every run' if result.aim_met_every_run else 'MISSED in some run'}"
    )
    return "\n".join(lines)


def _seeds(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.limits_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--seeds",
        type=_seeds,
        help="run these seeds one after another (N,M,...), each in DIR/seed-N",
    )
    parser.add_argument("--duration", type=float, default=80.0, help="seconds of arrivals")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds left out at the start")
    parser.add_argument("--out", required=True, help="directory for limits.json, records, logs")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="the token limit makes requests wait for their turn (wait: true) instead of a 429",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="the tokens tenant's limit, traffic and GPU, times this (more requests a run)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.duration - 10:
        parser.error("need 0 < --warmup < --duration - 10 (a window of 10 s at least)")
    if not args.scale > 0:
        parser.error("need --scale > 0")
    out = Path(args.out)
    seeds: list[int] = args.seeds or [args.seed]
    checks = []
    for seed in seeds:
        where = out / f"seed-{seed}" if args.seeds else out
        checks.append(_one(seed, args.duration, args.warmup, args.wait, args.scale, where))
    result = summary(checks)
    (out / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    print(render_summary(result))
    return 0


def _one(
    seed: int, duration_s: float, warmup_s: float, wait: bool, scale: float, out: Path
) -> LimitsCheck:
    out.mkdir(parents=True, exist_ok=True)
    scens = scenarios(seed, duration_s, scale)
    result = _run_loop(run(scens, out, wait=wait, scale=scale))
    for name in scens:
        write_jsonl(out / f"records-{name}.jsonl", result.records[name])
        write_jsonl(out / f"backend-{name}.jsonl", result.sims[name])
    (out / "counters.json").write_bytes(msgspec.json.encode(result.counters))
    check = summarise(result, scens, warmup_s, scale)
    (out / "limits.json").write_bytes(msgspec.json.format(msgspec.json.encode(check)) + b"\n")
    print(render(check), flush=True)
    return check


def _run_loop(main: Coroutine[object, None, Run]) -> Run:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


if __name__ == "__main__":
    sys.exit(main())
