"""``kvgate run --workers N``: requests/s of 1 against 2 workers behind one port, every feature
on (access log, three buckets per request, admission), against one fast stub backend.

The workers and the stub are not pinned (wrk runs on core 1, as in ``bench_overhead``), so on a
two-core machine the second worker competes with the load itself. The CPU columns say what a
request costs the workers (user + system time) and the load (the stub backend and wrk), and
give the ceiling that follows: with C cores, N workers serve at most
``min(N / gateway, C / (gateway + load))`` requests a second, whatever the gateway does.

    python -m loadtest.bench_workers [--duration 10] [--runs 3] [--connections 64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.bench_overhead import _BODY, _FULL, _POLICY, _cpu_s, _free_port, _process, _wrk


def _workers_cpu(pid: int) -> float:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return sum(_cpu_s(int(p)) for p in out.stdout.split()) + _cpu_s(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    py = sys.executable
    backend = _free_port()
    results: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stub = stack.enter_context(
            _process(
                [py, "-m", "loadtest.stub_backend", "--port", str(backend)],
                f"http://127.0.0.1:{backend}/",
            )
        )
        gateways = {}
        for workers in results:
            port = _free_port()
            policy = Path(tmp) / f"policy-{workers}.yaml"
            policy.write_text(_POLICY.format(port=port, backend=backend, **_FULL))
            cmd = [py, "-m", "gateway", "run", "-c", str(policy), "--workers", str(workers)]
            cmd += ["--admin-port", str(_free_port())]  # both gateways run at once
            proc = stack.enter_context(_process(cmd, f"http://127.0.0.1:{port}/readyz"))
            gateways[workers] = (f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)
        for run in range(args.runs):
            for workers, (url, pid) in gateways.items():
                _wrk(url, args.connections, 1, _BODY)
                before, load_before = _workers_cpu(pid), _load_cpu(stub.pid)
                requests, result = _wrk(url, args.connections, args.duration, _BODY)
                cpu_ms = (_workers_cpu(pid) - before) * 1000 / max(requests, 1)
                load_ms = (_load_cpu(stub.pid) - load_before) * 1000 / max(requests, 1)
                results[workers].append((result.rps, cpu_ms, load_ms))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    one = statistics.median(r for r, _, _ in results[1])
    cores = len(os.sched_getaffinity(0))
    print(f"\nmedians of {args.runs} runs, {args.connections} connections, JSON requests\n")
    print(
        "| workers | req/s | vs 1 worker | workers' CPU ms/req | load's CPU ms/req "
        f"| ceiling on {cores} cores, req/s | ceiling vs 1 worker |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for workers, rows in results.items():
        rps = statistics.median(r for r, _, _ in rows)
        cpu = statistics.median(c for _, c, _ in rows)
        load = statistics.median(x for _, _, x in rows)
        ceiling = min(workers / cpu, cores / (cpu + load)) * 1000
        print(
            f"| {workers} | {rps:.0f} | {rps / one:.2f}x | {cpu:.3f} | {load:.3f} "
            f"| {ceiling:.0f} | {ceiling / one:.2f}x |"
        )
    return 0


def _load_cpu(stub_pid: int) -> float:
    """CPU seconds of the stub backend and of every wrk run so far (children waited for)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _cpu_s(stub_pid) + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    sys.exit(main())
