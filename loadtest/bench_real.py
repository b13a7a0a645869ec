"""A real-backend benchmark: one seeded open-loop trace against a real OpenAI-compatible server,
sent three ways in one invocation (direct, through the concurrency limiter, through kvgate),
with the server's own preemption counter and waiting queue scraped from its ``/metrics``.

python -m loadtest.bench_real --cmd "python -m vllm.entrypoints.openai.api_server ..." \\
    --port 18100 --model tiny --signals vllm --kv 8,8,128,bf16 --context 2048 \\
    --requests 40 --prompt-tokens 1000 --output-tokens 500 --out DIR

The server is given by ``--url`` (already running) or ``--cmd`` (started here, in its own
process group, and stopped at the end). It is a benchmark, not a CI test: a run takes minutes.

Definitions of the figures: ``loadtest.real_report``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import yaml

from loadtest.generator import PlannedRequest, check_loopback, classify, parse_retry_after, plan
from loadtest.real_report import (
    SERVER_METRICS,
    SWEEP_EXTRA,
    Flavor,
    Record,
    ServerSample,
    Summary,
    best_limit,
    kvgate_figures,
    next_limit,
    parse_metrics,
    report,
    summarise,
)
from loadtest.real_targets import (
    TENANT,
    TENANT_KEY,
    Child,
    GatewaySpec,
    kvgate,
    limiter,
    parse_kv,
    wait_status,
)
from loadtest.records import Result
from loadtest.scenario import Bursts, Fixed, Poisson, Scenario, Slo, TenantSpec

_FILLER = "the quick brown fox jumps over the lazy dog while the kv cache fills up slowly "


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
        extra = 0
        while limits:
            limit = limits.pop(0)
            async with limiter(self.server, limit, self.out) as url:
                s = await self.one(f"limiter-{limit}", url, f"sweep limit{limit}")
            goodput[limit] = s.goodput_tokens_per_s
            further = None if limits or extra >= SWEEP_EXTRA else next_limit(goodput)
            if further is not None and further not in goodput:
                limits.append(further)
                extra += 1
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
                async with kvgate(self.gateway_spec(), self.server, self.out) as (url, admin):
                    await self.one(name, url, tag, admin=admin)


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
        if "limiter" in targets:
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
