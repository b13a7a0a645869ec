"""A real-backend benchmark: one seeded open-loop trace against a real OpenAI-compatible server,
sent three ways in one invocation (direct, through the concurrency limiter, through kvgate),
with the server's own preemption counter and waiting queue scraped from its ``/metrics``.

python -m loadtest.bench_real --cmd "python -m vllm.entrypoints.openai.api_server ..." \\
    --port 18100 --model tiny --signals vllm --kv 8,8,128,bf16 --context 2048 \\
    --requests 40 --prompt-tokens 1000 --output-tokens 500 --out DIR

The server is given by ``--url`` (already running) or ``--cmd`` (started here, in its own
process group, and stopped at the end). It is a benchmark, not a CI test: a run takes minutes.

Definitions (printed with the table):
- every prompt starts with a tag unique to its run and request, so a server's prefix cache
  never shares blocks between requests or between the targets of one invocation;
- output lengths are fixed: ``max_tokens`` is the drawn output length and ``ignore_eos`` is
  sent (vLLM and llama.cpp accept it), so every target is asked for the same tokens;
- *throughput*: output tokens of successful requests per second of the target's own makespan
  (first scheduled send to last answer);
- *goodput*: output tokens of requests that met the SLO (success, end-to-end latency and TTFT
  within bounds, both from the scheduled time) per second of one horizon shared by the targets
  of a repeat (the longest makespan among them), so a target that sheds is not paid for ending
  early;
- *TTFT*, *ITL*: time to the first content event from the scheduled time; gaps between content
  events of one stream, pooled over the run (events read together give zero gaps, so also
  *TPOT*: a request's time from first to last token per output token after the first);
  nearest-rank percentiles over successful requests;
- *preemptions*: increase of the server's counter over the run; *waiting max*: the largest
  waiting-queue gauge seen (sampled every ``--sample-every`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import shlex
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.generator import PlannedRequest, check_loopback, classify, parse_retry_after, plan
from loadtest.records import Result
from loadtest.scenario import Bursts, Fixed, Poisson, Scenario, Slo, TenantSpec
from loadtest.targets import free_port, key_hash, merge

Flavor = Literal["vllm", "llamacpp"]
TENANT = "bench"
TENANT_KEY = "sk-bench-real-0001"
_FILLER = "the quick brown fox jumps over the lazy dog while the kv cache fills up slowly "

# Server metric names per flavor: (preemption counter, waiting gauge, running gauge, kv share).
SERVER_METRICS: dict[Flavor, tuple[str | None, str, str, str | None]] = {
    "vllm": (
        "vllm:num_preemptions_total",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ),
    "llamacpp": (None, "llamacpp:requests_deferred", "llamacpp:requests_processing", None),
}


# --- the trace --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSpec:
    """What the flags ask for. ``rate_per_s`` 0 sends every request at t=0 (a closed burst);
    otherwise Poisson arrivals at that rate until ``requests`` are drawn."""

    requests: int
    prompt_tokens: int
    output_tokens: int
    rate_per_s: float
    seed: int
    slo_ttft_s: float
    slo_latency_s: float


def trace_scenario(spec: TraceSpec) -> Scenario:
    """The trace as a one-tenant scenario, so the generator's seeded ``plan`` draws it."""
    if spec.rate_per_s <= 0:
        arrivals: Poisson | Bursts = Bursts(every_s=1e9, size=spec.requests, spread_s=0.0)
        duration_s = 1.0
    else:
        arrivals = Poisson(rate_per_s=spec.rate_per_s)
        # Long enough to draw the count almost surely; plan() is cut to the count afterwards.
        duration_s = (spec.requests + 6.0 * math.sqrt(spec.requests) + 10.0) / spec.rate_per_s
    tenant = TenantSpec(
        key=TENANT_KEY,
        arrivals=[arrivals],
        prompt_tokens=Fixed(value=spec.prompt_tokens),
        output_tokens=Fixed(value=spec.output_tokens),
        max_tokens=Fixed(value=spec.output_tokens),
        stream_share=1.0,
        slo=Slo(ttft_s=spec.slo_ttft_s, latency_s=spec.slo_latency_s),
    )
    return Scenario(
        name="bench_real",
        description="real-backend benchmark trace",
        seed=spec.seed,
        duration_s=duration_s,
        max_requests=20000,
        tenants={TENANT: tenant},
    )


def trace(spec: TraceSpec) -> list[PlannedRequest]:
    return plan(trace_scenario(spec))[: spec.requests]


def prompt_text(tokens: int, chars_per_token: float, tag: str) -> str:
    """Filler of about ``tokens`` tokens (at ``chars_per_token``) that starts with ``tag``."""
    chars = max(len(tag) + 1, round(tokens * chars_per_token))
    head = f"[{tag}] "
    return (head + _FILLER * (chars // len(_FILLER) + 1))[:chars]


def request_body(
    item: PlannedRequest, model: str, chars_per_token: float, tag: str, ignore_eos: bool
) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "user", "content": prompt_text(item.prompt_tokens, chars_per_token, tag)}
        ],
        "max_tokens": item.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return msgspec.json.encode(body)


# --- records and their summary --------------------------------------------------------------


class Record(msgspec.Struct, kw_only=True):
    """One request as the client saw it; times in seconds from the run's start."""

    id: int
    scheduled_s: float
    status: int = 0
    result: Result = Result.UNFINISHED
    error: str | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    gaps_s: list[float] = []
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    retry_after_s: float | None = None

    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.scheduled_s

    def latency_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.scheduled_s

    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: robust to events that arrive together
        in one read, which make single gaps zero."""
        n = self.output_tokens
        if self.first_token_s is None or self.done_s is None or n is None or n < 2:
            return None
        return (self.done_s - self.first_token_s) / (n - 1)

    def within(self, slo_ttft_s: float, slo_latency_s: float) -> bool:
        ttft, latency = self.ttft_s(), self.latency_s()
        return (
            self.result is Result.OK
            and ttft is not None
            and latency is not None
            and ttft <= slo_ttft_s
            and latency <= slo_latency_s
        )


class ServerSample(msgspec.Struct, kw_only=True, frozen=True):
    t_s: float
    values: dict[str, float]


class Summary(msgspec.Struct, kw_only=True):
    requests: int
    ok: int
    within_slo: int
    shed: int
    errors: int  # every failure other than a 503 shed
    output_tokens: int
    goodput_tokens: int
    makespan_s: float
    throughput_tokens_per_s: float
    goodput_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    itl_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    preemptions: float | None
    waiting_max: float | None
    running_max: float | None
    kv_usage_max: float | None
    extra: dict[str, float] = {}  # target-specific figures (kvgate's queue wait, the limit)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least ``q`` of the sample at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def parse_metrics(text: str, names: Sequence[str]) -> dict[str, float]:
    """The sum over every series of each sample name in ``names`` that the text has (vLLM labels
    each series by engine and model; a sum is the server's total)."""
    wanted = set(names)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def counter_increase(samples: Sequence[ServerSample], name: str) -> float | None:
    """Increase of a counter over the samples; a drop (server restart) starts a new run."""
    seen = [s.values[name] for s in samples if name in s.values]
    if not seen:
        return None
    total = 0.0
    for before, after in itertools.pairwise(seen):
        total += after - before if after >= before else after
    return total


def gauge_max(samples: Sequence[ServerSample], name: str | None) -> float | None:
    seen = [s.values[name] for s in samples if name is not None and name in s.values]
    return max(seen) if seen else None


def summarise(
    records: Sequence[Record],
    samples: Sequence[ServerSample],
    flavor: Flavor,
    slo: Slo,
    horizon_s: float | None = None,
) -> Summary:
    """The numbers of one target's run. ``horizon_s`` divides goodput (default: the makespan)."""
    ok = [r for r in records if r.result is Result.OK]
    good = [r for r in ok if r.within(slo.ttft_s, slo.latency_s)]
    start = min((r.scheduled_s for r in records), default=0.0)
    end = max((r.done_s for r in records if r.done_s is not None), default=start)
    makespan = max(end - start, 1e-9)
    horizon = makespan if horizon_s is None else max(horizon_s, 1e-9)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    good_tokens = sum(r.output_tokens or 0 for r in good)
    ttfts = [t for r in ok if (t := r.ttft_s()) is not None]
    lats = [t for r in ok if (t := r.latency_s()) is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    tpots = [t for r in ok if (t := r.tpot_s()) is not None]
    preempt, waiting, running, kv = SERVER_METRICS[flavor]
    shed = sum(1 for r in records if r.result is Result.SHED)
    return Summary(
        requests=len(records),
        ok=len(ok),
        within_slo=len(good),
        shed=shed,
        errors=len(records) - len(ok) - shed,
        output_tokens=out_tokens,
        goodput_tokens=good_tokens,
        makespan_s=makespan,
        throughput_tokens_per_s=out_tokens / makespan,
        goodput_tokens_per_s=good_tokens / horizon,
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p90_s=percentile(ttfts, 0.9),
        ttft_p99_s=percentile(ttfts, 0.99),
        itl_p50_s=percentile(gaps, 0.5),
        itl_p90_s=percentile(gaps, 0.9),
        itl_p99_s=percentile(gaps, 0.99),
        tpot_p50_s=percentile(tpots, 0.5),
        tpot_p99_s=percentile(tpots, 0.99),
        latency_p50_s=percentile(lats, 0.5),
        latency_p99_s=percentile(lats, 0.99),
        preemptions=None if preempt is None else counter_increase(samples, preempt),
        waiting_max=gauge_max(samples, waiting),
        running_max=gauge_max(samples, running),
        kv_usage_max=gauge_max(samples, kv),
    )


def median_summary(runs: Sequence[Summary]) -> dict[str, float | None]:
    """Per field, the median over runs of the values that are present."""
    out: dict[str, float | None] = {}
    for name in Summary.__struct_fields__:
        if name == "extra":
            continue
        present = [float(v) for run in runs if (v := getattr(run, name)) is not None]
        out[name] = statistics.median(present) if present else None
    keys = sorted({k for run in runs for k in run.extra})
    for key in keys:
        present = [run.extra[key] for run in runs if key in run.extra]
        out[key] = statistics.median(present)
    return out


# Rows of the table: (label, field, format, whether a ratio to direct is shown).
_ROWS: tuple[tuple[str, str, str, bool], ...] = (
    ("requests ok / within SLO / shed / errors", "", "", False),
    ("goodput (SLO-met tok/s)", "goodput_tokens_per_s", "{:.0f}", True),
    ("throughput (tok/s)", "throughput_tokens_per_s", "{:.0f}", True),
    ("makespan (s)", "makespan_s", "{:.1f}", True),
    ("TTFT p50 / p90 / p99 (s)", "ttft", "{:.2f}", True),
    ("ITL gaps p50 / p90 / p99 (ms)", "itl", "{:.0f}", True),
    ("TPOT p50 / p99 (ms)", "tpot", "{:.0f}", True),
    ("latency p50 / p99 (s)", "latency", "{:.1f}", True),
    ("server preemptions", "preemptions", "{:.0f}", True),
    ("server waiting queue, max", "waiting_max", "{:.0f}", True),
    ("server running, max", "running_max", "{:.0f}", False),
    ("server KV use, max", "kv_usage_max", "{:.0%}", False),
)


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else spec.format(value * scale)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return ""
    if base == 0:
        return " (-)" if value == 0 else ""
    return f" ({value / base:.2f}x)"


def markdown_table(medians: Mapping[str, Mapping[str, float | None]], repeats: int) -> str:
    """One column per target, medians over ``repeats``; ratios against ``direct`` where it ran."""
    names = list(medians)
    base = medians.get("direct")
    lines = [
        f"| median of {repeats} | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for label, key, spec, ratio in _ROWS:
        cells = []
        for name in names:
            m = medians[name]
            if key == "":
                parts = (m["ok"], m["within_slo"], m["shed"], m["errors"])
                cells.append(" / ".join(_fmt(v, "{:.0f}") for v in parts))
            elif key in ("ttft", "itl", "tpot", "latency"):
                qs = ("p50", "p99") if key in ("latency", "tpot") else ("p50", "p90", "p99")
                scale = 1000.0 if key in ("itl", "tpot") else 1.0
                vals = [m[f"{key}_{q}_s"] for q in qs]
                text = " / ".join(_fmt(v, spec, scale) for v in vals)
                if ratio and base is not None and name != "direct":
                    text += _ratio(vals[0], base[f"{key}_p50_s"])
                cells.append(text)
            else:
                text = _fmt(m[key], spec)
                if ratio and base is not None and name != "direct":
                    text += _ratio(m[key], base[key])
                cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    extras = sorted({k for m in medians.values() for k in m if k not in _SUMMARY_KEYS})
    for key in extras:
        cells = [_fmt(medians[name].get(key), "{:.3g}") for name in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_SUMMARY_KEYS = frozenset(Summary.__struct_fields__)


def best_limit(goodput_by_limit: Mapping[int, float]) -> int:
    """The limit with the most goodput; ties go to the smaller limit (less server pressure)."""
    return min(goodput_by_limit, key=lambda n: (-goodput_by_limit[n], n))


# --- the kvgate policy ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySpec:
    model: str
    kv: tuple[int, int, int, str]  # layers, kv_heads, head_dim, dtype
    context: int
    chars_per_token: float
    signals: Flavor
    warmup: str = "0s"
    probe_interval: str = "500ms"
    max_wait: str = "120s"
    extra: Mapping[str, object] = field(default_factory=dict)


def parse_kv(text: str) -> tuple[int, int, int, str]:
    """``layers,kv_heads,head_dim[,dtype]`` (dtype defaults to bf16)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"--kv wants layers,kv_heads,head_dim[,dtype], got {text!r}")
    dtype = parts[3] if len(parts) == 4 else "bf16"
    return int(parts[0]), int(parts[1]), int(parts[2]), dtype


def kvgate_policy(spec: GatewaySpec, backend_url: str, port: int) -> dict[str, object]:
    """A policy for one real server: the model's KV profile, the flavor's signals (vLLM paged,
    llama.cpp slots, contiguous), admission at its defaults but for ``queue.max_wait``; then
    ``spec.extra`` deep-merged over the whole (to try other settings without editing code)."""
    layers, heads, dim, dtype = spec.kv
    backend: dict[str, object] = {
        "url": backend_url,
        "signals": spec.signals,
        "memory": "paged" if spec.signals == "vllm" else "contiguous",
        "warmup": spec.warmup,
        "probe_interval": spec.probe_interval,
    }
    policy: dict[str, object] = {
        "version": 1,
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "store": {"kind": "memory"},
        "models": {
            spec.model: {
                "kv": {"layers": layers, "kv_heads": heads, "head_dim": dim, "dtype": dtype},
                "context": spec.context,
                "default_max_tokens": min(1024, spec.context),
                "chars_per_token": spec.chars_per_token,
                "backends": [backend],
            }
        },
        "tenants": {TENANT: {"keys": [key_hash(TENANT_KEY)], "priority": "standard"}},
        "admission": {"queue": {"max_wait": spec.max_wait}},
    }
    return merge(policy, spec.extra)


# --- processes --------------------------------------------------------------------------------


class Child:
    """A process started here in its own session, so stopping it stops its children too
    (vLLM runs its engine in a child process)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @classmethod
    async def start(
        cls, name: str, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> Child:
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )
        return cls(name, proc, log)

    @classmethod
    async def shell(cls, name: str, command: str, log: Path) -> Child:
        return await cls.start(name, ["/bin/sh", "-c", "exec " + command], log)

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        # Children left in the group (an engine process whose parent died) go too.
        self.signal(signal.SIGKILL)


async def wait_status(
    url: str, ready: Callable[[int], bool], timeout_s: float, child: Child | None = None
) -> float:
    """Poll ``url`` until its status passes ``ready``; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while loop.time() - start < timeout_s:
            if child is not None and child.proc.returncode is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(url) as resp:
                    if ready(resp.status):
                        return loop.time() - start
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:g}s")


@contextlib.asynccontextmanager
async def limiter(backend: str, limit: int, workdir: Path) -> AsyncIterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "loadtest.limiter", "--backend", backend]
    args += ["--limit", str(limit), "--port", str(port)]
    child = await Child.start(f"limiter {limit}", args, workdir / f"limiter-{limit}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        # The limiter proxies every path: its /health is the backend's.
        await wait_status(url + "/health", lambda s: s == 200, 30.0, child)
        yield url
    finally:
        await child.stop()


@contextlib.asynccontextmanager
async def kvgate(
    spec: GatewaySpec, backend: str, workdir: Path, wait_ready: bool = True
) -> AsyncIterator[str]:
    port = free_port()
    path = workdir / "policy-kvgate.yaml"
    path.write_text(yaml.safe_dump(kvgate_policy(spec, backend, port), sort_keys=False))
    args = [sys.executable, "-m", "gateway", "run", "-c", str(path)]
    child = await Child.start("kvgate", args, workdir / "kvgate.log")
    url = f"http://127.0.0.1:{port}"
    try:
        ok = (lambda s: s == 200) if wait_ready else (lambda s: True)
        await wait_status(url + "/readyz", ok, 60.0, child)
        yield url
    finally:
        await child.stop()


# --- one run ----------------------------------------------------------------------------------


class _Chunk(msgspec.Struct):
    choices: list[dict[str, object]] = []
    usage: dict[str, object] | None = None
    error: dict[str, object] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _has_content(chunk: _Chunk) -> bool:
    for choice in chunk.choices:
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("content"):
            return True
    return False


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    record: Record,
    now_s: Callable[[], float],
) -> None:
    """POST one streamed chat completion and fill ``record`` as events arrive."""
    headers = {"Authorization": f"Bearer {TENANT_KEY}", "Content-Type": "application/json"}
    last: float | None = None
    try:
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                raw = await resp.read()
                error = None
                with contextlib.suppress(msgspec.DecodeError):
                    error = _decode_chunk(raw).error
                record.retry_after_s = parse_retry_after(resp.headers)
                record.error = str((error or {}).get("message", raw[:120].decode(errors="replace")))
                record.result = classify(resp.status, None)
                record.done_s = now_s()
                return
            async for line in resp.content:
                data = line.strip()
                if not data.startswith(b"data:"):
                    continue
                data = data[5:].strip()
                if data == b"[DONE]":
                    record.result = Result.OK
                    record.done_s = now_s()
                    return
                chunk = _decode_chunk(data)
                if chunk.error is not None:
                    record.result = Result.STREAM_ERROR
                    record.error = str(chunk.error.get("message"))
                    record.done_s = now_s()
                    return
                if _has_content(chunk):
                    t = now_s()
                    if record.first_token_s is None:
                        record.first_token_s = t
                    elif last is not None:
                        record.gaps_s.append(t - last)
                    last = t
                if chunk.usage is not None:
                    record.prompt_tokens = _int(chunk.usage.get("prompt_tokens"))
                    record.output_tokens = _int(chunk.usage.get("completion_tokens"))
            record.result = Result.STREAM_ERROR
            record.error = "stream ended without [DONE]"
            record.done_s = now_s()
    except (aiohttp.ClientError, ConnectionError, msgspec.DecodeError) as exc:
        record.result = Result.STREAM_ERROR if record.status == 200 else Result.CONNECTION_ERROR
        record.error = type(exc).__name__
        record.done_s = now_s()


async def sample_metrics(
    url: str,
    names: Sequence[str],
    out: list[ServerSample],
    now_s: Callable[[], float],
    every_s: float,
) -> None:
    """Scrape ``url`` every ``every_s`` until cancelled; a failed scrape is skipped."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        values = parse_metrics(await resp.text(), names)
                        out.append(ServerSample(t_s=now_s(), values=values))
            await asyncio.sleep(every_s)


async def run_once(
    target_url: str,
    planned: Sequence[PlannedRequest],
    *,
    model: str,
    chars_per_token: float,
    tag: str,
    ignore_eos: bool,
    metrics_urls: Mapping[str, tuple[str, Sequence[str]]],
    sample_every_s: float,
    deadline_s: float,
) -> tuple[list[Record], dict[str, list[ServerSample]]]:
    """Fire the trace open-loop at ``target_url``; sample each metrics URL meanwhile. Requests
    still running ``deadline_s`` after the start are cut (left ``unfinished``)."""
    check_loopback(target_url)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def now_s() -> float:
        return loop.time() - t0

    # The server's prefix cache outlives an invocation: the same tag from an earlier run would
    # share its blocks.
    nonce = f"{time.time_ns() % 10**12:x}"
    records = [Record(id=p.id, scheduled_s=p.at_s) for p in planned]
    samples: dict[str, list[ServerSample]] = {name: [] for name in metrics_urls}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        side = [
            asyncio.create_task(sample_metrics(u, n, samples[k], now_s, sample_every_s))
            for k, (u, n) in metrics_urls.items()
        ]
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(deadline_s):
                for item, record in zip(planned, records, strict=True):
                    await asyncio.sleep(max(0.0, t0 + item.at_s - loop.time()))
                    head = f"{nonce} {tag} {item.id}"
                    body = request_body(item, model, chars_per_token, head, ignore_eos)
                    coro = stream_chat(session, target_url, body, record, now_s)
                    tasks.append(asyncio.create_task(coro))
                await asyncio.gather(*tasks)
        except TimeoutError:
            pass
        finally:
            await asyncio.sleep(sample_every_s)  # one last scrape after the last answer
            for task in [*tasks, *side]:
                task.cancel()
            for task in [*tasks, *side]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return records, samples


async def calibrate_chars_per_token(server: str, model: str, flavor: Flavor) -> float | None:
    """Characters per token of the filler text, from the server's own tokenizer."""
    text = prompt_text(4000, 4.0, "calibration")
    body: dict[str, object]
    body = {"model": model, "prompt": text} if flavor == "vllm" else {"content": text}
    timeout = aiohttp.ClientTimeout(total=30)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError):
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(server + "/tokenize", json=body) as resp,
        ):
            data = await resp.json()
            count = data["count"] if "count" in data else len(data["tokens"])
            return len(text) / max(1, int(count))
    return None


async def wait_idle(metrics_url: str, flavor: Flavor, timeout_s: float = 120.0) -> None:
    """Wait until the server runs and queues nothing (the previous target's cut requests may
    still be finishing inside it)."""
    _, waiting, running, _ = SERVER_METRICS[flavor]
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while loop.time() < give_up:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                async with session.get(metrics_url) as resp:
                    values = parse_metrics(await resp.text(), [waiting, running])
                    if values.get(waiting, 0.0) == 0 and values.get(running, 0.0) == 0:
                        return
            await asyncio.sleep(0.5)


# --- the invocation ---------------------------------------------------------------------------


KVGATE_METRICS = (
    "kvgate_queue_wait_seconds_sum",
    "kvgate_queue_wait_seconds_count",
    "kvgate_queue_depth",
)


@dataclass(kw_only=True)
class Bench:
    args: argparse.Namespace
    server: str
    flavor: Flavor
    planned: list[PlannedRequest]
    slo: Slo
    chars_per_token: float
    out: Path
    log: Callable[[str], None]

    @property
    def server_metric_names(self) -> list[str]:
        return [n for n in SERVER_METRICS[self.flavor] if n is not None]

    def gateway_spec(self) -> GatewaySpec:
        a = self.args
        extra: dict[str, object] = {}
        if a.policy_extra:
            loaded = yaml.safe_load(Path(a.policy_extra).read_text(encoding="utf-8"))
            extra = loaded if isinstance(loaded, dict) else {}
        return GatewaySpec(
            model=a.model,
            kv=parse_kv(a.kv),
            context=a.context,
            chars_per_token=self.chars_per_token,
            signals=self.flavor,
            max_wait=a.max_wait,
            extra=extra,
        )

    async def one(self, name: str, url: str, tag: str, admin: str | None = None) -> Summary:
        await wait_idle(self.server + "/metrics", self.flavor)
        metrics: dict[str, tuple[str, Sequence[str]]] = {
            "server": (self.server + "/metrics", self.server_metric_names)
        }
        if admin is not None:
            metrics["kvgate"] = (admin + "/metrics", KVGATE_METRICS)
        states: list[dict[str, object]] = []
        poller = asyncio.create_task(_poll_state(admin, states)) if admin else None
        started = time.monotonic()
        records, samples = await run_once(
            url,
            self.planned,
            model=self.args.model,
            chars_per_token=self.chars_per_token,
            tag=tag,
            ignore_eos=not self.args.no_ignore_eos,
            metrics_urls=metrics,
            sample_every_s=self.args.sample_every,
            deadline_s=self.args.deadline,
        )
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        summary = summarise(records, samples["server"], self.flavor, self.slo)
        if "kvgate" in samples:
            summary.extra.update(kvgate_figures(samples["kvgate"], states))
        stem = self.out / f"{tag.replace(' ', '-')}"
        stem.with_suffix(".records.json").write_bytes(msgspec.json.encode(records))
        stem.with_suffix(".samples.json").write_bytes(msgspec.json.encode(samples))
        if states:
            stem.with_suffix(".state.json").write_bytes(msgspec.json.encode(states))
        self.log(
            f"{tag}: {time.monotonic() - started:.0f}s ok={summary.ok} "
            f"slo={summary.within_slo} shed={summary.shed} err={summary.errors} "
            f"tput={summary.throughput_tokens_per_s:.0f} ttft50={summary.ttft_p50_s} "
            f"preempt={summary.preemptions} waiting_max={summary.waiting_max}"
        )
        return summary

    async def sweep(self) -> int:
        limits = [int(x) for x in self.args.limits.split(",") if x.strip()]
        if len(limits) == 1:
            return limits[0]
        goodput: dict[int, float] = {}
        for limit in limits:
            async with limiter(self.server, limit, self.out) as url:
                s = await self.one(f"limiter-{limit}", url, f"sweep limit{limit}")
            goodput[limit] = s.goodput_tokens_per_s
        best = best_limit(goodput)
        self.log(f"limiter sweep goodput {goodput} -> limit {best}")
        return best

    async def repeat(self, index: int, targets: Sequence[str], limit: int) -> None:
        """One run of each target; its files in ``out`` are what ``report`` reads."""
        # Rotate the order so that drift in the server (caches, heat) does not favour one target.
        order = list(targets[index % len(targets) :]) + list(targets[: index % len(targets)])
        for name in order:
            tag = f"r{index} {name}"
            if name == "direct":
                await self.one(name, self.server, tag)
            elif name == "limiter":
                async with limiter(self.server, limit, self.out) as url:
                    await self.one(name, url, tag)
            else:
                async with kvgate(self.gateway_spec(), self.server, self.out) as url:
                    await self.one(name, url, tag, admin=url)


async def _poll_state(url: str | None, out: list[dict[str, object]]) -> None:
    """kvgate's /admin/state once a second: queue depth, reservations, overcommit."""
    if url is None:
        return
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                async with session.get(url + "/admin/state") as resp:
                    state = await resp.json()
                    out.append({"t_s": loop.time() - t0, "state": state})
            await asyncio.sleep(1.0)


def kvgate_figures(
    samples: Sequence[ServerSample], states: Sequence[Mapping[str, object]]
) -> dict[str, float]:
    """Where kvgate's time goes: mean queue wait of admitted requests, its largest queue, and
    from /admin/state the most KV it reserved and the overcommit it applied."""
    out: dict[str, float] = {}
    last = samples[-1].values if samples else {}
    count = last.get("kvgate_queue_wait_seconds_count", 0.0)
    if count:
        out["kvgate_queue_wait_mean_s"] = last.get("kvgate_queue_wait_seconds_sum", 0.0) / count
    depth = gauge_max(samples, "kvgate_queue_depth")
    if depth is not None:
        out["kvgate_queue_depth_max"] = depth
    reserved: list[float] = []
    overcommit: list[float] = []
    inflight: list[float] = []
    for entry in states:
        for backend in _backends(entry.get("state")):
            for key, into in (
                ("reserved_bytes", reserved),
                ("overcommit", overcommit),
                ("inflight", inflight),
            ):
                value = backend.get(key)
                if isinstance(value, int | float):
                    into.append(float(value))
    if reserved:
        out["kvgate_reserved_gib_max"] = max(reserved) / 2**30
    if overcommit:
        out["kvgate_overcommit_max"] = max(overcommit)
    if inflight:
        out["kvgate_inflight_max"] = max(inflight)
    return out


def _backends(state: object) -> list[Mapping[str, object]]:
    """The backend entries of an /admin/state answer, wherever they sit in it."""
    found: list[Mapping[str, object]] = []
    if isinstance(state, Mapping):
        backends = state.get("backends")
        if isinstance(backends, list):
            found.extend(b for b in backends if isinstance(b, Mapping) and "url" in b)
        for value in state.values():
            if value is not backends:
                found.extend(_backends(value))
    elif isinstance(state, list):
        for value in state:
            found.extend(_backends(value))
    return found


def load_runs(out: Path, flavor: Flavor, slo: Slo) -> dict[str, list[Summary]]:
    """Summaries from the files a run left in ``out`` (``r<i>-<target>.*.json``), one list per
    target in repeat order, goodput over each repeat's shared horizon."""
    repeats: dict[int, dict[str, Summary]] = {}
    for path in sorted(out.glob("r*-*.records.json")):
        tag = path.name.removesuffix(".records.json")
        number, name = tag[1:].split("-", 1)
        records = msgspec.json.decode(path.read_bytes(), type=list[Record])
        samples_path = out / f"{tag}.samples.json"
        samples = msgspec.json.decode(samples_path.read_bytes(), type=dict[str, list[ServerSample]])
        summary = summarise(records, samples.get("server", []), flavor, slo)
        state_path = out / f"{tag}.state.json"
        states = msgspec.json.decode(state_path.read_bytes()) if state_path.exists() else []
        if "kvgate" in samples:
            summary.extra.update(kvgate_figures(samples["kvgate"], states))
        repeats.setdefault(int(number), {})[name] = summary
    runs: dict[str, list[Summary]] = {}
    for index in sorted(repeats):
        horizon = max(s.makespan_s for s in repeats[index].values())
        for name, summary in repeats[index].items():
            summary.goodput_tokens_per_s = summary.goodput_tokens / horizon
            runs.setdefault(name, []).append(summary)
    return runs


def report(out: Path, flavor: Flavor, slo: Slo, order: Sequence[str]) -> str:
    runs = load_runs(out, flavor, slo)
    names = [n for n in order if n in runs] + [n for n in runs if n not in order]
    medians = {name: median_summary(runs[name]) for name in names}
    repeats = max((len(r) for r in runs.values()), default=0)
    table = markdown_table(medians, repeats)
    (out / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(runs)))
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    return table


async def main_async(args: argparse.Namespace, out: Path) -> int:
    logfile = (out / "bench.log").open("a", encoding="utf-8")

    def log(line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, file=sys.stderr, flush=True)
        print(stamped, file=logfile, flush=True)

    flavor: Flavor = args.signals
    server_child: Child | None = None
    if args.cmd:
        server = f"http://127.0.0.1:{args.port}"
        server_child = await Child.shell("server", args.cmd, out / "server.log")
        took = await wait_status(server + "/health", lambda s: s == 200, 600.0, server_child)
        log(f"server ready after {took:.1f}s")
    else:
        server = args.url.rstrip("/")
    check_loopback(server)
    try:
        cpt = args.chars_per_token or await calibrate_chars_per_token(server, args.model, flavor)
        if cpt is None:
            raise RuntimeError("cannot tokenize on the server; pass --chars-per-token")
        log(f"chars per token: {cpt:.3f}")
        slo = Slo(ttft_s=args.slo_ttft, latency_s=args.slo_latency)
        spec = TraceSpec(
            requests=args.requests,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            rate_per_s=args.rate,
            seed=args.seed,
            slo_ttft_s=args.slo_ttft,
            slo_latency_s=args.slo_latency,
        )
        bench = Bench(
            args=args,
            server=server,
            flavor=flavor,
            planned=trace(spec),
            slo=slo,
            chars_per_token=cpt,
            out=out,
            log=log,
        )
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        limit = await bench.sweep() if "limiter" in targets else 0
        for index in range(args.repeats):
            await bench.repeat(index, targets, limit)
        print(report(out, flavor, slo, targets))
        log(f"limiter limit used: {limit}")
        return 0
    finally:
        if server_child is not None:
            await server_child.stop()
        logfile.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_real", description=__doc__.splitlines()[0]
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:18100")
    where.add_argument("--cmd", help="a command that starts the server on 127.0.0.1:--port")
    p.add_argument("--port", type=int, default=18100, help="the port --cmd's server listens on")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--signals", choices=("vllm", "llamacpp"), default="vllm")
    p.add_argument("--kv", required=True, help="layers,kv_heads,head_dim[,dtype]")
    p.add_argument("--context", type=int, required=True, help="the server's max model length")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson req/s; 0: all at t=0")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--output-tokens", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slo-ttft", type=float, default=10.0, help="seconds")
    p.add_argument("--slo-latency", type=float, default=90.0, help="seconds")
    p.add_argument("--chars-per-token", type=float, default=None, help="default: ask /tokenize")
    p.add_argument("--no-ignore-eos", action="store_true", help="for servers that refuse it")
    p.add_argument("--targets", default="direct,limiter,kvgate")
    p.add_argument("--limits", default="8,16,24", help="limiter sweep; one value: no sweep")
    p.add_argument("--max-wait", default="120s", help="kvgate's queue.max_wait")
    p.add_argument("--policy-extra", default=None, help="YAML deep-merged into kvgate's policy")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--deadline", type=float, default=300.0, help="cut a run after this many s")
    p.add_argument("--sample-every", type=float, default=0.5, help="seconds between scrapes")
    p.add_argument("--out", required=True, help="directory for records, summary and table")
    p.add_argument(
        "--report-only", action="store_true", help="summarise --out's files, send nothing"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.report_only:
        slo = Slo(ttft_s=args.slo_ttft, latency_s=args.slo_latency)
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        print(report(Path(args.out), args.signals, slo, targets))
        return 0
    if args.url is None and shlex.split(args.cmd) == []:
        print("error: empty --cmd", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(main_async(args, out))


if __name__ == "__main__":
    sys.exit(main())
