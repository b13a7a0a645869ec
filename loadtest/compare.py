"""The three-way comparison: one seeded trace against the simulated backend direct, behind a
request-count limiter (kvgate with only ``requests`` limits and admission off), and behind kvgate
with the adaptive policy. Each target gets a fresh simulator with the scenario's config; the
backend is sampled (``/sim/stats``) through the run and restarted on the scenario's cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args

import aiohttp
import msgspec

from loadtest import plots
from loadtest.bound import upper_bound
from loadtest.ceiling import ceiling_tokens_per_s
from loadtest.generator import Extra, PlannedRequest, run_trace
from loadtest.oracle import clairvoyant
from loadtest.real_report import SWEEP_EXTRA, best_limit, next_limit
from loadtest.records import BackendSample, RequestRecord, Result, write_jsonl
from loadtest.report import TargetSummary, render_markdown, render_table, summarise
from loadtest.scenario import Scenario
from loadtest.targets import TargetError, free_port, gateway, limiter, simulator

TargetName = Literal["direct", "count_limited", "limiter", "kvgate"]
TARGETS: tuple[TargetName, ...] = get_args(TargetName)
SAMPLE_EVERY_S = 0.5


class Comparison(msgspec.Struct, kw_only=True):
    """summary.json: the names the lead's checks read are fixed; the rest is free to grow.
    ``ceiling_tokens_per_s`` is the LP bound (the steady-state estimate at mean sizes is
    ``trace.ceiling_tokens_per_s``)."""

    scenario: str
    seed: int
    ceiling_tokens_per_s: float
    targets: dict[str, TargetSummary]
    trace: TraceShape
    failed: dict[str, str] = {}  # target -> why it could not run
    bound_tokens_per_s: float = 0.0  # no gateway's goodput can exceed it (loadtest.bound)
    oracle_tokens_per_s: float = 0.0  # achieved by the clairvoyant scheduler (loadtest.oracle)
    # the same scheduler when a contiguous backend allocates the max_tokens each request asks
    # (as for every target here); equal to oracle_tokens_per_s on a paged backend
    oracle_as_sent_tokens_per_s: float = 0.0
    horizon_s: float = 0.0  # every goodput is per second of this
    limiter_sweep: dict[str, float] = {}  # limit -> goodput tok/s; the best is "limiter"
    limiter_limit: int | None = None


class TraceShape(msgspec.Struct, kw_only=True, frozen=True):
    requests: int
    mean_prompt_tokens: float
    mean_output_tokens: float
    mean_max_tokens: float
    ceiling_tokens_per_s: float  # wall-clock output tokens/s the simulated GPU cannot beat


def trace_shape(scenario: Scenario, planned: Sequence[PlannedRequest]) -> TraceShape:
    count = max(1, len(planned))
    prompt = sum(p.prompt_tokens for p in planned) / count
    output = max(1.0, sum(p.output_tokens for p in planned) / count)
    reserved = max(output, sum(p.max_tokens for p in planned) / count)
    return TraceShape(
        requests=len(planned),
        mean_prompt_tokens=prompt,
        mean_output_tokens=output,
        mean_max_tokens=reserved,
        ceiling_tokens_per_s=ceiling_tokens_per_s(
            scenario.backend, max(1.0, prompt), output, mean_max_tokens=reserved
        ),
    )


def served_ceiling(scenario: Scenario, records: Sequence[RequestRecord]) -> float:
    """The ceiling for the requests a target served (0 when it served none)."""
    served = [r for r in records if r.result is Result.OK and r.output_tokens]
    if not served:
        return 0.0
    prompt = sum(r.prompt_tokens or r.planned_prompt_tokens for r in served) / len(served)
    output = sum(r.output_tokens or 0 for r in served) / len(served)
    reserved = max(output, sum(r.max_tokens for r in served) / len(served))
    return ceiling_tokens_per_s(
        scenario.backend, max(1.0, prompt), max(1.0, output), mean_max_tokens=reserved
    )


def sampler(sim_url: str, into: list[BackendSample]) -> Extra:
    async def sample(t0: float) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
                    async with session.get(sim_url + "/sim/stats") as resp:
                        if resp.status == 200:
                            stats = msgspec.json.decode(await resp.read(), type=dict[str, object])
                            into.append(BackendSample(t_s=loop.time() - t0, stats=stats))
                await asyncio.sleep(SAMPLE_EVERY_S)

    return sample


def restarter(sim_url: str, at_s: float) -> Extra:
    async def restart(t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at_s - asyncio.get_running_loop().time()))
        url = sim_url + "/admin/restart"
        async with aiohttp.ClientSession() as session, session.post(url) as resp:
            print(f"backend restart at {at_s:g}s: HTTP {resp.status}", file=sys.stderr)

    return restart


async def run_target(
    scenario: Scenario,
    planned: Sequence[PlannedRequest],
    target: TargetName,
    workdir: Path,
    limit: int | None = None,
) -> tuple[list[RequestRecord], list[BackendSample]]:
    """One target on a fresh simulator. For a cold start (``backend_wait: listening``) the
    gateway starts first, so its start-up does not eat into the backend's load time and every
    target meets the same loading backend when the trace begins."""
    samples: list[BackendSample] = []
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    wait = scenario.backend_wait

    def sim() -> contextlib.AbstractAsyncContextManager[str]:
        return simulator(scenario.backend, workdir, target, wait, sim_port)

    def front() -> contextlib.AbstractAsyncContextManager[str]:
        if target == "limiter":
            spec = scenario.limiter
            return limiter(sim_url, limit or spec.limit, spec.max_wait_s, workdir)
        if target == "direct":
            raise ValueError("direct has no front")
        return gateway(scenario, target, sim_url, workdir)

    async with contextlib.AsyncExitStack() as stack:
        if target == "direct":
            url = await stack.enter_async_context(sim())
        elif wait == "listening":
            url = await stack.enter_async_context(front())
            await stack.enter_async_context(sim())
        else:
            await stack.enter_async_context(sim())
            url = await stack.enter_async_context(front())
        extras = [sampler(sim_url, samples)]
        if scenario.restart_at_s is not None:
            extras.append(restarter(sim_url, scenario.restart_at_s))
        print(f"--- {scenario.name}: {target} at {url}", file=sys.stderr)
        records = await run_trace(scenario, planned, url, extras=extras)
    return records, samples


Results = dict[str, tuple[list[RequestRecord], list[BackendSample]]]


def summarise_all(
    scenario: Scenario, results: Results, bound: float = 0.0, oracle: float = 0.0
) -> dict[str, TargetSummary]:
    """Every target's summary over the one horizon, with its shares of the bound and oracle."""
    weights = {name: tenant.weight for name, tenant in scenario.tenants.items()}
    run_s = scenario.duration_s + scenario.drain_timeout_s
    summaries: dict[str, TargetSummary] = {}
    for target, (records, samples) in results.items():
        summary = summarise(records, weights, scenario.duration_s, run_s, samples)
        good = summary.goodput_tokens_per_s
        summaries[target] = msgspec.structs.replace(
            summary,
            served_ceiling_tokens_per_s=served_ceiling(scenario, records),
            bound_share=good / bound if bound > 0 else 0.0,
            oracle_share=good / oracle if oracle > 0 else 0.0,
        )
    return summaries


def write_results(
    scenario: Scenario,
    planned: Sequence[PlannedRequest],
    out: Path,
    results: Results,
    failed: dict[str, str],
    sweep: Mapping[int, float] | None = None,
) -> Comparison:
    """Write records, samples, summary.json, report.md and the plots into ``out``; print the
    table on stdout."""
    shape = trace_shape(scenario, planned)
    bound = upper_bound(scenario, planned).tokens_per_s
    oracle = clairvoyant(scenario, planned).tokens_per_s
    as_sent = oracle
    if scenario.backend.mode != "paged":
        as_sent = clairvoyant(scenario, planned, as_sent=True).tokens_per_s
    for target, (records, samples) in results.items():
        write_jsonl(out / f"records-{target}.jsonl", records)
        write_jsonl(out / f"backend-{target}.jsonl", samples)
    summaries = summarise_all(scenario, results, bound, oracle)
    best = max(sweep, key=lambda k: sweep[k]) if sweep else None
    result = Comparison(
        scenario=scenario.name,
        seed=scenario.seed,
        ceiling_tokens_per_s=bound,
        targets=summaries,
        trace=shape,
        failed=failed,
        bound_tokens_per_s=bound,
        oracle_tokens_per_s=oracle,
        oracle_as_sent_tokens_per_s=as_sent,
        horizon_s=scenario.duration_s + scenario.drain_timeout_s,
        limiter_sweep={str(k): v for k, v in (sweep or {}).items()},
        limiter_limit=best if sweep else (scenario.limiter.limit if "limiter" in results else None),
    )
    (out / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    images = plots.draw_all(
        {t: r for t, (r, _) in results.items()},
        {t: s for t, (_, s) in results.items()},
        bound,
        result.horizon_s,
        out,
    )
    report = render_markdown(scenario, bound, summaries, failed, images, oracle)
    (out / "report.md").write_text(report)
    print(render_table(summaries, bound, oracle))
    return result


async def sweep_limiter(
    scenario: Scenario, planned: Sequence[PlannedRequest], out: Path
) -> tuple[tuple[list[RequestRecord], list[BackendSample]], dict[int, float]]:
    """Run the limiter at each limit of ``scenario.limiter.sweep`` on the same trace, then
    further out while the best is at an end (``next_limit``, at most ``SWEEP_EXTRA`` more);
    return the best run (by goodput over the horizon) and every limit's goodput."""
    weights = {name: tenant.weight for name, tenant in scenario.tenants.items()}
    run_s = scenario.duration_s + scenario.drain_timeout_s
    goodput: dict[int, float] = {}
    runs: dict[int, tuple[list[RequestRecord], list[BackendSample]]] = {}
    todo = list(scenario.limiter.sweep)
    extra = 0
    while todo:
        limit = todo.pop(0)
        print(f"--- limiter sweep: limit {limit}", file=sys.stderr)
        runs[limit] = run = await run_target(scenario, planned, "limiter", out, limit)
        goodput[limit] = summarise(run[0], weights, scenario.duration_s, run_s).goodput_tokens_per_s
        further = None if todo or extra >= SWEEP_EXTRA else next_limit(goodput)
        if further is not None and further not in goodput:
            todo.append(further)
            extra += 1
    return runs[best_limit(goodput)], goodput


async def run_targets(
    scenario: Scenario,
    planned: Sequence[PlannedRequest],
    out: Path,
    targets: Sequence[TargetName] = TARGETS,
) -> tuple[Results, dict[str, str], dict[int, float]]:
    """Run every target in turn (process logs and configs go into ``out``): (records and backend
    samples by target, why by target that could not start, the limiter sweep's goodput by
    limit). One failure does not stop the rest."""
    results: Results = {}
    failed: dict[str, str] = {}
    sweep: dict[int, float] = {}
    for target in targets:
        try:
            if target == "limiter" and scenario.limiter.sweep:
                results[target], sweep = await sweep_limiter(scenario, planned, out)
            else:
                results[target] = await run_target(scenario, planned, target, out)
        except TargetError as exc:
            failed[target] = str(exc)
            print(f"--- {target} failed: {exc}", file=sys.stderr)
    return results, failed, sweep
