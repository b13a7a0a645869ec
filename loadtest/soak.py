"""Soak: a gateway under mixed traffic for minutes, with policy reloads, a backend restart and a
Redis restart, while its RSS, open files, asyncio tasks and Redis keys are sampled; the
report is each resource's least-squares slope over the second half of the run (the first half
warms caches and pools), in units per minute.

    python -m loadtest.soak --minutes 10 --out soak.json

Everything runs on 127.0.0.1: a simulated backend (``python -m gateway.sim``), a redis-server
of its own on a free port (never the shared one), and the gateway (``kvgate run``) as child
processes; the traffic is chat (streamed and not), embeddings, bad bodies, unknown paths and
slow clients that give up, from three tenants.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

POLICY = """
version: 1
server:
  port: {port}
  anonymous_tenant: anon
  access_log: false
  connections: {{per_client: 4096}}
store: {{kind: redis, url: "redis://127.0.0.1:{redis}/0", on_error: allow}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    default_max_tokens: 64
    backends:
      - {{url: "http://127.0.0.1:{sim}", kv_capacity: 4GiB, signals: vllm, warmup: 1s,
         probe_interval: 500ms, expected_load: 2s}}
tenants:
  anon:
    limits: [{{unit: requests, rate: {rate}/s}}]
  a:
    keys: ["env:SOAK_KEY_A"]
    limits: [{{unit: tokens, rate: 2M/min}}]
  b:
    keys: ["env:SOAK_KEY_B"]
    limits: [{{unit: requests, rate: 20/s}}]
admission:
  queue: {{max_wait: 10s}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    open_files: int
    tasks: float
    redis_keys: int


@dataclass
class Run:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_min(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (seconds), per minute."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return 60.0 * cov / var if var else 0.0


async def _tasks(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("kvgate_asyncio_tasks "):
                return float(line.split()[1])
    return -1.0


async def _client(session: aiohttp.ClientSession, url: str, run: Run, stop: float) -> None:
    rng = random.Random()
    keys = {"a": os.environ["SOAK_KEY_A"], "b": os.environ["SOAK_KEY_B"]}
    while time.monotonic() < stop:
        kind = rng.choices(
            ["chat", "stream", "embed", "bad", "unknown", "giveup"], [40, 30, 10, 8, 6, 6]
        )[0]
        tenant = rng.choice([None, "a", "b"])
        headers = {"Authorization": f"Bearer {keys[tenant]}"} if tenant else {}
        chat = {
            "model": "m1",
            "messages": [{"role": "user", "content": "x" * rng.randint(10, 2000)}],
            "max_tokens": rng.randint(1, 64),
        }
        try:
            if kind == "embed":
                request = session.post(
                    f"{url}/v1/embeddings",
                    json={"model": "m1", "input": "y" * 200},
                    headers=headers,
                )
            elif kind == "bad":
                request = session.post(
                    f"{url}/v1/chat/completions",
                    data=b'{"model": "m1", "messages": [',
                    headers=headers,
                )
            elif kind == "unknown":
                request = session.post(f"{url}/admin/restart", json={}, headers=headers)
            else:
                body = {**chat, "stream": kind != "chat"}
                request = session.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            timeout = 0.05 if kind == "giveup" else 60
            async with asyncio.timeout(timeout):
                async with request as response:
                    await response.read()
                    run.statuses[response.status] += 1
        except TimeoutError:
            run.errors["client_gave_up" if kind == "giveup" else "timeout"] += 1
        except aiohttp.ClientError as exc:
            run.errors[type(exc).__name__] += 1
        await asyncio.sleep(rng.expovariate(20))


async def _spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _until_up(session: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(60):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            await asyncio.sleep(0.2)


async def soak(minutes: float, clients: int, sample_s: float) -> dict[str, object]:
    ports = {"port": free_port(), "redis": free_port(), "sim": free_port()}
    os.environ.setdefault("SOAK_KEY_A", "sk-soak-a")
    os.environ.setdefault("SOAK_KEY_B", "sk-soak-b")
    workdir = Path(tempfile.mkdtemp(prefix="kvgate-soak-"))
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(rate=500, **ports))
    redis_args = (
        "redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    )  # fmt: skip
    sim_args = (sys.executable, "-m", "gateway.sim", "--port", str(ports["sim"]))
    sim_args += ("--model", "m1", "--load-time-s", "2", "--time-scale", "4")
    redis_proc = await _spawn(*redis_args)
    sim = await _spawn(*sim_args)
    gateway = await _spawn(
        # one process: the soak samples this pid's memory (a Redis store defaults to one a core)
        *(sys.executable, "-m", "gateway", "run", "-c", str(policy), "--workers", "1"),
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{ports['port']}"
    run = Run()
    store = aioredis.Redis(port=ports["redis"])
    started = time.monotonic()
    stop = started + minutes * 60
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients * 2)
        ) as session:
            await _until_up(session, f"{url}/healthz")
            await _until_up(session, f"http://127.0.0.1:{ports['sim']}/health")
            workers = [
                asyncio.create_task(_client(session, url, run, stop)) for _ in range(clients)
            ]
            plan = {0.2: "reload", 0.35: "backend_restart", 0.5: "reload", 0.6: "redis_restart"}
            plan |= {0.8: "reload"}
            while (now := time.monotonic()) < stop:
                share = (now - started) / (stop - started)
                for at in [at for at in plan if at <= share]:
                    event = plan.pop(at)
                    run.events.append((round(now - started, 1), event))
                    if event == "reload":
                        rate = random.choice([400, 500, 600])
                        policy.write_text(POLICY.format(rate=rate, **ports))
                    elif event == "backend_restart":
                        await _stop(sim)
                        sim = await _spawn(*sim_args)
                    else:
                        await _stop(redis_proc)
                        await asyncio.sleep(3)  # the gateway rides on its fallback meanwhile
                        redis_proc = await _spawn(*redis_args)
                try:
                    keys = int(await store.dbsize())
                except aioredis.RedisError:
                    keys = -1
                run.samples.append(
                    Sample(
                        t_s=round(now - started, 1),
                        rss_mib=round(_rss_mib(gateway.pid), 2),
                        open_files=_open_files(gateway.pid),
                        tasks=await _tasks(session, url),
                        redis_keys=keys,
                    )
                )
                await asyncio.sleep(sample_s)
            await asyncio.gather(*workers)
    finally:
        await store.aclose()
        for proc in (gateway, sim, redis_proc):
            await _stop(proc)
    half = [s for s in run.samples if s.t_s >= minutes * 30]
    xs = [s.t_s for s in half]
    slopes = {
        name: round(slope_per_min(xs, [float(getattr(s, name)) for s in half]), 4)
        for name in ("rss_mib", "open_files", "tasks")
    }
    keyed = [s for s in half if s.redis_keys >= 0]
    slopes["redis_keys"] = round(
        slope_per_min([s.t_s for s in keyed], [float(s.redis_keys) for s in keyed]), 4
    )
    return {
        "minutes": minutes,
        "requests": sum(run.statuses.values()),
        "statuses": dict(run.statuses),
        "client_errors": dict(run.errors),
        "events": run.events,
        "slopes_per_min_second_half": slopes,
        "first": run.samples[0].__dict__ if run.samples else None,
        "last": run.samples[-1].__dict__ if run.samples else None,
        "samples": [s.__dict__ for s in run.samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args.minutes, args.clients, args.sample_s))
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.write_text(text)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
