"""Several kvgate replicas in front of one simulated backend, sharing admission through Redis.

``Fleet`` starts (as child processes on 127.0.0.1) a Redis of its own, one simulated contiguous
backend and N gateways, and stops them all; ``drive`` sends closed-loop load round robin over the
gateways and counts what came back. The scale-out tests and benchmarks run on it.

python -m loadtest.replicas --replicas 3 --clients 48 --duration 20 [--no-shared]
python -m loadtest.replicas --limits --replicas 3 --clients 48 --duration 15
python -m loadtest.replicas --bands --clients 32 --duration 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
MODEL = "llama-3.1-8b"
KEYS = {"heavy": "sk-fleet-heavy", "light": "sk-fleet-light"}  # tenants of weight 2 and 1
# tenants with one global limit each (``limits``): requests, and tokens (prompt + output)
KEYS |= {"per_request": "sk-fleet-per-request", "per_token": "sk-fleet-per-token"}
# tenants of equal weight in the best and the worst band (``bands``)
KEYS |= {"urgent": "sk-fleet-urgent", "spare": "sk-fleet-spare"}
REQUESTS_LIMIT = (20.0, 20.0)  # rate per second, burst
TOKENS_LIMIT = (4000.0, 4000.0)

POLICY = """\
version: 1
server: {{port: {port}, admin: {{port: {admin_port}}}, anonymous_tenant: anon, access_log: false}}
store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/0", prefix: {prefix}, replicas: {n}}}
models:
  {model}:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 4096
    backends:
      - url: http://127.0.0.1:{sim_port}
        memory: contiguous
        warmup: 0s
        expected_load: 2s
        probe_interval: 200ms
tenants:
  anon: {{priority: standard}}
  heavy: {{keys: ["env:KVGATE_FLEET_HEAVY"], weight: 2}}
  light: {{keys: ["env:KVGATE_FLEET_LIGHT"], weight: 1}}
  urgent: {{keys: ["env:KVGATE_FLEET_URGENT"], priority: critical}}
  spare: {{keys: ["env:KVGATE_FLEET_SPARE"], priority: sheddable}}
  per_request:
    keys: ["env:KVGATE_FLEET_PER_REQUEST"]
    limits: [{{unit: requests, rate: {req_rate}/s, burst: {req_burst}}}]
  per_token:
    keys: ["env:KVGATE_FLEET_PER_TOKEN"]
    limits: [{{unit: tokens, rate: {tok_rate}/s, burst: {tok_burst}}}]
admission:
  queue: {{max_wait: 30s}}
{shared}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Tally:
    ok: int = 0
    shed: int = 0
    oom: int = 0
    other: int = 0
    failed: int = 0  # no HTTP answer (connection refused or reset, timeout)
    limited: int = 0  # 429: over a rate limit
    output_tokens: int = 0
    tokens: int = 0  # prompt + output of what was served, as the backend counted them
    latencies: list[float] = field(default_factory=list)
    counted_at: list[float] = field(default_factory=list)  # when each request not 429 was sent

    def line(self, seconds: float) -> str:
        lat = sorted(self.latencies) or [0.0]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"ok {self.ok} ({self.ok / seconds:.1f}/s, {self.output_tokens / seconds:.0f} tok/s)"
            f" shed {self.shed} oom {self.oom} other {self.other} failed {self.failed}"
            f" latency p50 {statistics.median(lat):.2f}s p99 {p99:.2f}s max {lat[-1]:.2f}s"
        )


class Fleet:
    """Redis, one simulated contiguous GPU and ``replicas`` gateways, as child processes."""

    def __init__(
        self,
        replicas: int,
        *,
        shared: bool = True,
        lease: str = "2s",
        kv_blocks: int = 256,
        time_scale: float = 4.0,
        sim_args: tuple[str, ...] = (),
    ) -> None:
        self.replicas = replicas
        self.shared = shared
        self.lease = lease
        self.kv_blocks = kv_blocks
        self.time_scale = time_scale
        self.sim_args = sim_args
        self.redis_port = free_port()
        self.sim_port = free_port()
        self.ports = [free_port() for _ in range(replicas)]
        self.admin_ports = [free_port() for _ in range(replicas)]
        self.prefix = f"fleet{os.getpid()}{int(time.time())}"
        self._dir = tempfile.TemporaryDirectory(prefix="kvgate-fleet-")
        self.log_dir = Path(self._dir.name)  # each gateway's stderr: gateway<i>.log
        self.redis: asyncio.subprocess.Process | None = None
        self.sim: asyncio.subprocess.Process | None = None
        self.gateways: list[asyncio.subprocess.Process | None] = [None] * replicas

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def admin_urls(self) -> list[str]:
        """Each gateway's admin listener (/metrics, /admin/state)."""
        return [f"http://127.0.0.1:{p}" for p in self.admin_ports]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    async def start(self) -> None:
        await self.start_redis()
        self.sim = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.sim",
            "--port",
            str(self.sim_port),
            "--mode",
            "contiguous",
            "--kv-blocks",
            str(self.kv_blocks),
            "--time-scale",
            str(self.time_scale),
            *self.sim_args,
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
        )
        await _until_up(f"http://127.0.0.1:{self.sim_port}/health")
        for i in range(self.replicas):
            await self.start_gateway(i)

    async def start_redis(self) -> None:
        self.redis = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
        )
        await _until_port(self.redis_port)

    async def stop_redis(self) -> None:
        if self.redis is not None:
            await _stop(self.redis, signal.SIGKILL)
            self.redis = None

    async def start_gateway(self, i: int) -> None:
        shared = f"  shared: {{lease: {self.lease}, refresh: 100ms, timeout: 100ms}}\n"
        text = POLICY.format(
            port=self.ports[i],
            admin_port=self.admin_ports[i],
            redis_port=self.redis_port,
            prefix=self.prefix,
            n=self.replicas,
            model=MODEL,
            sim_port=self.sim_port,
            shared=shared if self.shared else "",
            req_rate=REQUESTS_LIMIT[0],
            req_burst=REQUESTS_LIMIT[1],
            tok_rate=TOKENS_LIMIT[0],
            tok_burst=TOKENS_LIMIT[1],
        )
        path = Path(self._dir.name) / f"gateway{i}.yaml"
        path.write_text(text)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "KVGATE_FLEET_HEAVY": KEYS["heavy"],
            "KVGATE_FLEET_LIGHT": KEYS["light"],
            "KVGATE_FLEET_PER_REQUEST": KEYS["per_request"],
            "KVGATE_FLEET_PER_TOKEN": KEYS["per_token"],
            "KVGATE_FLEET_URGENT": KEYS["urgent"],
            "KVGATE_FLEET_SPARE": KEYS["spare"],
        }
        with (self.log_dir / f"gateway{i}.log").open("ab") as log:
            self.gateways[i] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "run",
                "-c",
                str(path),
                "--workers",  # one process per replica: a replica here is one gateway
                "1",
                cwd=ROOT,
                env=env,
                stderr=log,
            )
        await _until_up(f"{self.urls[i]}/readyz")

    async def kill_gateway(self, i: int) -> None:
        proc = self.gateways[i]
        if proc is not None:
            await _stop(proc, signal.SIGKILL)
            self.gateways[i] = None

    async def oom_errors(self) -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.sim_port}/metrics") as resp,
        ):
            text = await resp.text()
        found = re.search(r"^kvgate_sim_oom_errors_total(?:{[^}]*})? (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    async def close(self) -> None:
        for proc in [*self.gateways, self.sim]:
            if proc is not None:
                await _stop(proc, signal.SIGTERM)
        self.gateways = [None] * self.replicas
        self.sim = None
        await self.stop_redis()
        self._dir.cleanup()

    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def drive(
    urls: list[str],
    *,
    clients: int,
    duration_s: float,
    max_tokens: int = 256,
    prompt_chars: int = 800,
    timeout_s: float = 40.0,
    tenant: str | None = None,
) -> Tally:
    """Closed-loop clients, each sending to the gateways in turn until ``duration_s`` passed;
    a shed answer waits a little (no Retry-After honoured: the load stays an overload)."""
    tally = Tally()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x" * prompt_chars}],
        "max_tokens": max_tokens,
    }
    end = time.monotonic() + duration_s
    headers = {} if tenant is None else {"Authorization": f"Bearer {KEYS[tenant]}"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < end:
                url = urls[i % len(urls)] + "/v1/chat/completions"
                i += 1
                t0 = time.monotonic()
                try:
                    async with session.post(url, json=body, headers=headers) as resp:
                        data = await resp.read()
                except (aiohttp.ClientError, TimeoutError):
                    tally.failed += 1
                    await asyncio.sleep(0.05)
                    continue
                tally.latencies.append(time.monotonic() - t0)
                if resp.status != 429:
                    tally.counted_at.append(t0)
                if resp.status == 200:
                    tally.ok += 1
                    found = re.search(rb'"completion_tokens":\s*(\d+)', data)
                    tally.output_tokens += int(found.group(1)) if found else 0
                    found = re.search(rb'"total_tokens":\s*(\d+)', data)
                    tally.tokens += int(found.group(1)) if found else 0
                elif resp.status == 429:
                    tally.limited += 1
                    await asyncio.sleep(0.1)
                elif resp.status == 503:
                    tally.shed += 1
                    await asyncio.sleep(0.1)
                elif b"oom" in data:
                    tally.oom += 1
                else:
                    tally.other += 1

        await asyncio.gather(*(client(k) for k in range(clients)))
    return tally


async def _until_port(port: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def _until_up(url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not up within {within_s}s")
            await asyncio.sleep(0.1)


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def weights(replicas: int, clients: int, duration_s: float) -> tuple[Tally, Tally]:
    """Tenants of weight 2 and 1 under overload, each on its own replica (or both on one):
    what each was served."""
    async with Fleet(replicas) as fleet:
        heavy_urls, light_urls = fleet.urls[:1], fleet.urls[-1:]
        heavy, light = await asyncio.gather(
            drive(heavy_urls, clients=clients, duration_s=duration_s, tenant="heavy"),
            drive(light_urls, clients=clients, duration_s=duration_s, tenant="light"),
        )
    return heavy, light


@dataclass
class LimitCheck:
    """What a tenant with one global limit got through every replica, against that limit over
    the same span: ``burst + rate * span`` (span: from the first request sent to the last one
    counted, so the ends of the run do not count against it)."""

    unit: str
    admitted: float
    allowed: float

    @property
    def ratio(self) -> float:
        return self.admitted / self.allowed

    def line(self) -> str:
        return (
            f"{self.unit}: admitted {self.admitted:.0f} against {self.allowed:.0f} allowed "
            f"({(self.ratio - 1) * 100:+.1f}%)"
        )


def _allowed(tally: Tally, start: float, limit: tuple[float, float]) -> float:
    rate, burst = limit
    span = max(tally.counted_at, default=start) - start
    return burst + rate * span


async def limits(replicas: int, clients: int, duration_s: float) -> list[LimitCheck]:
    """A tenant with a requests limit and one with a tokens limit, each sending far more than
    its limit round robin over every replica (clients each), on a backend that is never the
    bottleneck (outputs always ``max_tokens``, so what is charged is what is served)."""
    sim = ("--output-mean-ratio", "1", "--output-sigma", "0")
    async with Fleet(replicas, kv_blocks=8192, time_scale=20.0, sim_args=sim) as fleet:
        start = time.monotonic()
        per_request, per_token = await asyncio.gather(
            drive(
                fleet.urls,
                clients=clients,
                duration_s=duration_s,
                tenant="per_request",
                max_tokens=16,
                prompt_chars=80,
            ),
            drive(
                fleet.urls,
                clients=clients,
                duration_s=duration_s,
                tenant="per_token",
                max_tokens=64,
                prompt_chars=400,
            ),
        )
    for tally in (per_request, per_token):
        if tally.shed or tally.failed or tally.other or tally.oom:
            raise RuntimeError(f"the backend was a bottleneck: {tally.line(duration_s)}")
    return [
        LimitCheck(
            "requests", len(per_request.counted_at), _allowed(per_request, start, REQUESTS_LIMIT)
        ),
        LimitCheck("tokens", per_token.tokens, _allowed(per_token, start, TOKENS_LIMIT)),
    ]


async def bands(replicas: int, clients: int, duration_s: float) -> tuple[Tally, Tally]:
    """A critical tenant and a sheddable one of equal weight under overload, each on its own
    replica (or both on one): what each was served."""
    async with Fleet(replicas) as fleet:
        urgent, spare = await asyncio.gather(
            drive(fleet.urls[:1], clients=clients, duration_s=duration_s, tenant="urgent"),
            drive(fleet.urls[-1:], clients=clients, duration_s=duration_s, tenant="spare"),
        )
    return urgent, spare


async def _main(args: argparse.Namespace) -> None:
    if args.bands:
        for replicas in (1, 2):
            urgent, spare = await bands(replicas, args.clients // 2, args.duration)
            total = max(urgent.output_tokens + spare.output_tokens, 1)
            print(
                f"replicas {replicas}: critical got {urgent.output_tokens} tokens "
                f"({urgent.output_tokens / total:.0%}), sheddable {spare.output_tokens} "
                f"(shed {spare.shed})"
            )
        return
    if args.limits:
        for check in await limits(args.replicas, args.clients, args.duration):
            print(f"replicas {args.replicas}: {check.line()}")
        return
    if args.weights:
        for replicas in (1, 2):
            heavy, light = await weights(replicas, args.clients // 2, args.duration)
            ratio = heavy.output_tokens / max(light.output_tokens, 1)
            print(
                f"replicas {replicas}: weight 2 got {heavy.output_tokens} tokens, weight 1 got "
                f"{light.output_tokens}: {ratio:.2f}:1"
            )
        return
    async with Fleet(args.replicas, shared=not args.no_shared) as fleet:
        tally = await drive(fleet.urls, clients=args.clients, duration_s=args.duration)
        print(f"replicas {args.replicas} shared {not args.no_shared}: {tally.line(args.duration)}")
        print(f"backend OOM errors: {await fleet.oom_errors():.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--no-shared", action="store_true")
    parser.add_argument(
        "--bands",
        action="store_true",
        help="a critical and a sheddable tenant, on one replica, then each on its own of two",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="tenants with one global requests or tokens limit, over every replica",
    )
    parser.add_argument(
        "--weights",
        action="store_true",
        help="tenants of weight 2 and 1, on one replica, then each on its own of two",
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
