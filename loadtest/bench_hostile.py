"""A hostile tenant's oversized bodies against another tenant's latency.

``python -m loadtest.bench_hostile --seconds 20``: a gateway (``kvgate run``) in front of the
simulated GPU; tenant ``bad`` (limited to 1 request/s) sends, from four loops, 3 MB bodies of
1,000,000 empty chat messages; tenant ``good`` sends small chats from two loops meanwhile. It
prints the good tenant's latency percentiles and what the bad bodies got, and the event-loop
time one such body costs the request parser in this process (median of 5). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from loadtest.targets import free_port

_POLICY = """
version: 1
server:
  {{port: {port}, access_log: false, max_body: 8MiB, drain_delay: 0s, admin: {{port: {admin}}}}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    backends: [{{url: "http://127.0.0.1:{sim}", kv_capacity: 4GiB, signals: vllm, warmup: 0s}}]
tenants:
  bad:
    keys: ["env:BAD_KEY"]
    limits: [{{unit: requests, rate: 1/s}}]
  good:
    keys: ["env:GOOD_KEY"]
    limits: [{{unit: requests, rate: 1000/s}}]
"""
_BODY = b'{"model":"m1","messages":[' + b",".join([b"{}"] * 1_000_000) + b"]}"
_CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
_GOOD = {"Authorization": "Bearer sk-good"}
_BAD = {"Authorization": "Bearer sk-bad", "Content-Type": "application/json"}


def parse_cost_ms() -> float:
    """Median milliseconds the request path spends refusing one hostile body (bounds, parse)."""
    from gateway.policy.compile import RequestLimits
    from gateway.proxy.apis import bounds, routes

    times = []
    for _ in range(5):
        start = time.perf_counter()
        with contextlib.suppress(Exception):  # the refusal is what is timed
            bounds.check_body(_BODY, RequestLimits())
            routes.parse_request(_BODY, "/v1/chat/completions")
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


async def _loop(stop: float, step: Callable[[], Awaitable[None]]) -> None:
    while time.monotonic() < stop:
        await step()


async def run(seconds: float) -> dict[str, object]:
    port, admin, sim = free_port(), free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="kvgate-hostile-"))
    policy = workdir / "policy.yaml"
    policy.write_text(_POLICY.format(port=port, admin=admin, sim=sim))
    env = dict(os.environ, BAD_KEY="sk-bad", GOOD_KEY="sk-good")
    quiet = asyncio.subprocess.DEVNULL
    backend = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.sim", "--port", str(sim), "--model", "m1",
        "--time-scale", "50", env=env, stderr=quiet,
    )  # fmt: skip
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "-c", str(policy), env=env, stderr=quiet
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    good_s: list[float] = []
    bad: list[tuple[int, float]] = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(url, json=_CHAT, headers=_GOOD) as answer:
                        if answer.status == 200:
                            break
                await asyncio.sleep(0.2)
            stop = time.monotonic() + seconds

            async def attack() -> None:
                start = time.monotonic()
                async with session.post(url, data=_BODY, headers=_BAD) as answer:
                    await answer.read()
                    bad.append((answer.status, time.monotonic() - start))

            async def serve() -> None:
                start = time.monotonic()
                async with session.post(url, json=_CHAT, headers=_GOOD) as answer:
                    await answer.read()
                good_s.append(time.monotonic() - start)
                await asyncio.sleep(0.02)

            await asyncio.gather(
                *(_loop(stop, attack) for _ in range(4)), *(_loop(stop, serve) for _ in range(2))
            )
    finally:
        for process in (gateway, backend):
            process.terminate()
            await process.wait()
    cuts = statistics.quantiles(good_s, n=100)
    return {
        "good_requests": len(good_s),
        "good_p50_ms": round(1000 * statistics.median(good_s), 1),
        "good_p99_ms": round(1000 * cuts[98], 1),
        "bad_bodies": len(bad),
        "bad_statuses": sorted({status for status, _ in bad}),
        "bad_median_s": round(statistics.median(s for _, s in bad), 3),
        "refusal_ms_in_this_process": round(parse_cost_ms(), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_hostile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
