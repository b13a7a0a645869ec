"""CPU per request counted in instructions, which stay put on a shared, noisy machine where
requests/s do not. Each target (the bare aiohttp proxy, the same proxy on kvgate's upstream
client, then kvgate with its features switched off one after another, as in
``bench_overhead --ladder``) runs under valgrind's callgrind in front of the stub backend;
after a warm-up, counting is switched on for a fixed number of JSON chat requests and the total
is divided by their number. Repeated runs agree within about 0.3%.

    python -m loadtest.bench_instructions --requests 1000 --connections 16

Needs valgrind (callgrind_control comes with it). A run takes a few minutes: Python under
callgrind is some fifty times slower.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from loadtest.bench_overhead import _BODY, _LADDER, _POLICY, _free_port, _pin, _process

_START_S = 300.0  # a gateway under callgrind takes a minute or more to import and bind


async def _send(url: str, requests: int, connections: int) -> None:
    body = json.dumps(_BODY).encode()
    left = requests
    failed = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as http:

        async def worker() -> None:
            nonlocal left, failed
            while left > 0:
                left -= 1
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
                    failed += response.status != 200

        await asyncio.gather(*(worker() for _ in range(connections)))
    if failed:
        raise RuntimeError(f"{failed} of {requests} requests to {url} failed")


def _instructions(out_prefix: Path) -> int:
    total = 0
    for path in out_prefix.parent.glob(out_prefix.name + ".*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total


def _count(cmd: list[str], ready_url: str, url: str, args: argparse.Namespace, out: Path) -> float:
    grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    grind.append(f"--callgrind-out-file={out}.%p")
    with _process([*_pin(0), *grind, *cmd], ready_url, timeout_s=_START_S) as proc:
        asyncio.run(_send(url, args.warmup, args.connections))
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_send(url, args.requests, args.connections))
        subprocess.run([*control, "-i", "off", str(proc.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)  # the dump is written by the process itself
    return _instructions(out) / args.requests


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per target")
    parser.add_argument("--warmup", type=int, default=300, help="requests sent before counting")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if not shutil.which("callgrind_control"):
        print("valgrind is needed: apt-get install valgrind", file=sys.stderr)
        return 2
    py = sys.executable
    backend = _free_port()
    backend_url = f"http://127.0.0.1:{backend}"
    path = "/v1/chat/completions"
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stub = [*_pin(1), py, "-m", "loadtest.stub_backend", "--port", str(backend)]
        stack.enter_context(_process(stub, f"{backend_url}/"))
        port = _free_port()
        bare = [py, "-m", "loadtest.bare_proxy", "--port", str(port), "--upstream", backend_url]
        base = f"http://127.0.0.1:{port}"
        rows.append(
            ("bare aiohttp proxy", _count(bare, f"{base}/", base + path, args, Path(tmp) / "bare"))
        )
        port = _free_port()
        own = [*bare[:3], "--port", str(port), "--upstream", backend_url, "--client", "kvgate"]
        base = f"http://127.0.0.1:{port}"
        rows.append(
            (
                "bare proxy on kvgate's upstream client",
                _count(own, f"{base}/", base + path, args, Path(tmp) / "own"),
            )
        )
        for i, (name, settings) in enumerate(_LADDER):
            port, admin = _free_port(), _free_port()
            policy = Path(tmp) / f"policy-{i}.yaml"
            policy.write_text(_POLICY.format(port=port, backend=backend, **settings))
            gate = [py, "-m", "gateway", "run", "-c", str(policy), "--admin-port", str(admin)]
            base = f"http://127.0.0.1:{port}"
            per = _count(gate, f"{base}/readyz", base + path, args, Path(tmp) / f"gate{i}")
            rows.append((name, per))
            print(f"{name}: {per:,.0f}", file=sys.stderr, flush=True)
    floor, own_floor = rows[0][1], rows[1][1]
    print(f"\ninstructions per JSON request, {args.requests} over {args.connections} connections\n")
    print(
        "| target | instructions/request | bare aiohttp proxy / target"
        " | bare proxy on kvgate's client / target |"
    )
    print("|---|---:|---:|---:|")
    for name, per in rows:
        print(f"| {name} | {per:,.0f} | {floor / per:.2f}x | {own_floor / per:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
