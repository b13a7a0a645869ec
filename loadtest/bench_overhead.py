"""Proxy overhead, measured in one run against one fast stub backend:
direct-to-backend, a bare aiohttp pass-through (the floor a Python proxy pays), the same
pass-through on kvgate's own upstream client (the strongest simple rival), and kvgate.

Each proxy is pinned to core 0, the backend and the load tool (wrk) to core 1 (where taskset and
two cores exist). Reports requests/s, p50/p99 latency, the proxy's CPU time per request (from
/proc/<pid>/stat: user + system) and ratios against the bare proxy, as medians over --runs runs.

    python -m loadtest.bench_overhead --duration 10 --runs 3
    python -m loadtest.bench_overhead --ladder    # what each feature of kvgate costs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_BARE = "bare aiohttp proxy"
_OWN = "bare proxy on kvgate's upstream client"
_BODY = {
    "model": "bench",
    "messages": [{"role": "user", "content": "Say ok sixteen times."}],
    "max_tokens": 16,
}
# "stream": the stub sends the whole stream in one write; "paced": one event per write, in
# separate TCP segments, as a server sends tokens while it decodes (per-chunk costs show).
_BODIES: dict[str, dict[str, object]] = {
    "json": _BODY,
    "stream": {**_BODY, "stream": True},
    "paced": {**_BODY, "stream": True, "user": "paced"},
}

_POLICY = """
version: 1
server: {{host: 127.0.0.1, port: {port}, anonymous_tenant: bench, access_log: {access_log}}}
admission: {{enabled: {admission}}}
models:
  bench:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    default_max_tokens: 64
    backends:
      - {{url: "http://127.0.0.1:{backend}", kv_capacity: 1TiB, signals: none, warmup: 0s,
          max_concurrency: 100000}}
tenants:
  bench:
    limits: {limits}
"""
# Limits far above the load, so every request passes through all three buckets.
_LIMITS = """
      - {unit: requests, rate: 1M/s}
      - {unit: tokens, rate: 1G/s}
      - {unit: kv_gib_seconds, rate: 1M/s}"""

# --ladder: kvgate with one feature after another switched off by its policy, to price each.
_FULL = {"access_log": "true", "admission": "true", "limits": _LIMITS}
_LADDER = (
    ("kvgate", _FULL),
    ("kvgate, no access log", {**_FULL, "access_log": "false"}),
    ("kvgate, no access log, no limits", {**_FULL, "access_log": "false", "limits": "[]"}),
    (
        "kvgate, no access log, no limits, no admission",
        {"access_log": "false", "admission": "false", "limits": "[]"},
    ),
)


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_req: float | None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pin(core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core)]
    return []


@contextlib.contextmanager
def _process(
    cmd: list[str], ready_url: str, timeout_s: float = 20.0
) -> Iterator[subprocess.Popen[bytes]]:
    # Logs go to a file: a pipe nobody reads would block the process once full.
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115  # closed in finally, kept for reading
        prefix="kvgate-bench-", suffix=".log", delete=False
    )
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{cmd} did not come up; see {log.name}") from None
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        log.close()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _wrk(url: str, connections: int, duration: int, body: dict[str, object]) -> tuple[int, Result]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
        )
    out = subprocess.run(
        [
            *_pin(1),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            script.name,
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses (logs: /tmp/kvgate-bench-*)")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return requests, Result(rps, _pct(out, "50%"), _pct(out, "99%"), None)


def _pct(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _measure(url: str, pid: int | None, connections: int, duration: int, mode: str) -> Result:
    body = _BODIES[mode]
    _wrk(url, connections, 1, body)  # warm-up: connections, caches, JIT-free but lazy imports
    before = _cpu_s(pid) if pid else 0.0
    requests, result = _wrk(url, connections, duration, body)
    if pid:
        result.cpu_ms_per_req = (_cpu_s(pid) - before) * 1000 / max(requests, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; medians are printed")
    parser.add_argument("--connections", type=int, default=32, help="the fixed-concurrency load")
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="price kvgate's features instead: JSON at --connections only, kvgate with the\n"
        "access log, the limits and admission switched off one after another",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    py = sys.executable
    backend, bare = _free_port(), _free_port()
    gateways = _LADDER if args.ladder else _LADDER[:1]
    modes = ("json",) if args.ladder else tuple(_BODIES)
    loads = (args.connections,) if args.ladder else (args.connections, 1)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        backend_url = f"http://127.0.0.1:{backend}"
        stack.enter_context(
            _process(
                [*_pin(1), py, "-m", "loadtest.stub_backend", "--port", str(backend)],
                f"{backend_url}/",
            )
        )
        bare_cmd = [*_pin(0), py, "-m", "loadtest.bare_proxy", "--port", str(bare)]
        bare_proc = stack.enter_context(
            _process([*bare_cmd, "--upstream", backend_url], f"http://127.0.0.1:{bare}/")
        )
        own = _free_port()
        own_cmd = [*_pin(0), py, "-m", "loadtest.bare_proxy", "--port", str(own), "--client"]
        own_proc = stack.enter_context(
            _process([*own_cmd, "kvgate", "--upstream", backend_url], f"http://127.0.0.1:{own}/")
        )
        path = "/v1/chat/completions"
        targets: list[tuple[str, str, int | None]] = [
            (_BARE, f"http://127.0.0.1:{bare}{path}", bare_proc.pid),
            (_OWN, f"http://127.0.0.1:{own}{path}", own_proc.pid),
        ]
        if not args.ladder:
            targets.insert(0, ("direct", backend_url + path, None))
        for name, settings in gateways:
            port = _free_port()
            policy = Path(tmp) / f"policy-{port}.yaml"
            policy.write_text(_POLICY.format(port=port, backend=backend, **settings))
            # an admin port each: the policy's default one is shared by every gateway here
            admin = str(_free_port())
            gate_cmd = [*_pin(0), py, "-m", "gateway", "run", "-c", str(policy)]
            gate_cmd += ["--admin-port", admin]
            gate_proc = stack.enter_context(_process(gate_cmd, f"http://127.0.0.1:{port}/readyz"))
            targets.append((name, f"http://127.0.0.1:{port}{path}", gate_proc.pid))
        cells: dict[tuple[str, str, int], list[Result]] = {}
        for run in range(args.runs):
            for mode in modes:
                for conns in loads:
                    for name, url, pid in targets:
                        cells.setdefault((name, mode, conns), []).append(
                            _measure(url, pid, conns, args.duration, mode)
                        )
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    _print(cells, args.runs)
    return 0


def _median(results: list[Result]) -> Result:
    cpu = [r.cpu_ms_per_req for r in results if r.cpu_ms_per_req is not None]
    return Result(
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        statistics.median(cpu) if cpu else None,
    )


def _print(cells: dict[tuple[str, str, int], list[Result]], runs: int) -> None:
    print(f"\nmedians of {runs} runs; proxy pinned to core 0, backend and wrk to core 1")
    print("(ratios: medians of each run's own ratio, so drift between runs cancels)\n")
    print(
        "| target | body | conns | req/s | p50 ms | p99 ms | CPU ms/req | req/s vs bare | "
        "req/s vs bare on kvgate's client | added p50 ms vs bare |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, mode, conns), results in cells.items():
        med = _median(results)
        bare = cells[(_BARE, mode, conns)]
        own = cells[(_OWN, mode, conns)]
        cpu = f"{med.cpu_ms_per_req:.3f}" if med.cpu_ms_per_req is not None else "-"
        print(
            f"| {name} | {mode} | {conns} | {med.rps:.0f} | {med.p50_ms:.3f} | {med.p99_ms:.3f} | "
            f"{cpu} | {_paired(results, bare):.2f} | {_paired(results, own):.2f} | "
            f"{med.p50_ms - _median(bare).p50_ms:+.3f} |"
        )


def _paired(results: list[Result], baseline: list[Result]) -> float:
    """The median over runs of each run's req/s against the baseline's in the same run."""
    return statistics.median(r.rps / b.rps for r, b in zip(results, baseline, strict=True))


if __name__ == "__main__":
    sys.exit(main())
