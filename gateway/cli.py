"""``kvgate run | validate | explain | demo`` (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.resources
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from gateway import logs
from gateway.core.clock import MonotonicClock
from gateway.core.cost import ContextOverflowError, estimate
from gateway.errors import PolicyError
from gateway.policy.compile import Policy, store_kind
from gateway.policy.watcher import read_policy
from gateway.proxy.apis.common import BadRequestBody
from gateway.proxy.apis.routes import parse_request

if TYPE_CHECKING:
    from gateway.workers import Group


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve with a policy file (hot-reloaded on change or SIGHUP)")
    run.add_argument("-c", "--config", type=Path, help="default: the bundled demo policy")
    run.add_argument("--host", help="listen here instead of the policy's server.host")
    run.add_argument("--port", type=int, help="listen here instead of the policy's server.port")
    run.add_argument(
        "--workers",
        type=int,
        help="worker processes on the port (SO_REUSEPORT); default: one per core with a Redis "
        "store, 1 with the in-memory one (where each of N workers keeps 1/N of every limit "
        "and backend)",
    )
    validate = sub.add_parser("validate", help="check policy files; exit 1 on the first error")
    validate.add_argument("files", type=Path, nargs="+")
    explain = sub.add_parser("explain", help="show a request's cost and the limits that apply")
    explain.add_argument("-c", "--config", type=Path, help="default: the bundled demo policy")
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--path", default="/v1/chat/completions")
    explain.add_argument("request", type=Path, help="the request body, as JSON")
    demo = sub.add_parser("demo", help="a simulated GPU backend and the gateway, ready for curl")
    demo.add_argument("-c", "--config", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args.files)
        if args.command == "explain":
            body = args.request.read_bytes()
            config = args.config or _bundled_policy()
            return asyncio.run(_explain(config, args.tenant, args.path, args.request, body))
        if args.command == "demo":
            return _serve(args.config or _bundled_policy(), demo=True)
        config = args.config or _bundled_policy()
        return _serve(config, demo=False, host=args.host, port=args.port, workers=args.workers)
    except PolicyError as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 1


def _validate(files: list[Path]) -> int:
    status = 0
    for path in files:
        try:
            policy, _ = read_policy(path)
        except PolicyError as exc:
            print(f"{exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok (fingerprint {policy.fingerprint})")
    return status


async def _explain(config: Path, tenant_name: str, path: str, request: Path, body: bytes) -> int:
    from gateway.app import build_store

    policy, _ = read_policy(config)
    tenant = policy.tenants.get(tenant_name)
    if tenant is None:
        print(f"kvgate: no tenant {tenant_name!r} in {config}", file=sys.stderr)
        return 1
    try:
        parsed = parse_request(body, path)
    except BadRequestBody as exc:
        print(f"kvgate: {request}: {exc.message}", file=sys.stderr)
        return 1
    model = policy.models.get(parsed.model)
    if model is None:
        print(f"kvgate: no model {parsed.model!r} in {config}", file=sys.stderr)
        return 1
    try:
        cost = estimate(parsed, model.profile, None)
    except ContextOverflowError as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 1
    print(f"request: tenant {tenant.name}, model {model.name}, priority {tenant.priority.name}")
    print("estimated cost:")
    for unit, amount in (
        ("input_tokens", cost.input_tokens),
        ("output_tokens (reserved)", cost.output_tokens),
        ("kv_bytes", f"{cost.kv_bytes} ({cost.kv_bytes / 2**30:.3f} GiB)"),
        ("kv_gib_seconds", f"{cost.kv_gib_seconds:.4f}"),
        ("price", f"{cost.price:.6f}"),
    ):
        print(f"  {unit:26} {amount}")
    specs = policy.buckets(tenant.name, model.name)
    store = build_store(policy, MonotonicClock())
    try:
        remaining = await store.peek(specs) if specs else ()
    finally:
        await store.close()
    print(f"limits ({len(specs)}, all must pass; state from the {store_kind(policy)} store):")
    for spec, left in zip(specs, remaining, strict=True):
        need = cost.amount(spec.unit)
        if need > spec.burst:
            verdict = "NEVER (larger than the burst)"
        else:
            verdict = "passes now" if need <= left else "would wait"
        print(
            f"  {spec.key:40} rate {spec.rate_per_s:.6g}/s burst {spec.burst:.6g}"
            f"  needs {need:.6g}, has {left:.6g}: {verdict}"
        )
    if tenant.shadow:
        print("shadow mode: refusals are reported, never enforced")
    return 0


def _bundled_policy() -> Path:
    """The default policy: package data of an installed wheel, else the checkout's file (an
    editable install maps ``gateway.policies`` only for imports that go through its finder)."""
    try:
        path = Path(str(importlib.resources.files("gateway.policies").joinpath("default.yaml")))
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"
    if not path.exists():
        raise PolicyError(str(path), "not found: the installation is incomplete; pass -c POLICY")
    return path


def _serve(
    config: Path,
    *,
    demo: bool,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> int:
    policy, digest = read_policy(config)
    listen = (host or policy.server.host, policy.server.port if port is None else port)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if store_kind(policy) == "redis" else 1
    if workers < 1:
        raise PolicyError("--workers", f"must be at least 1, got {workers}")
    logs.configure()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    if workers == 1:
        runner(_run(policy, config.resolve(), digest, listen, demo=demo))
        return 0
    from gateway.workers import Group, supervise

    if store_kind(policy) == "memory":
        logging.getLogger("kvgate").warning(
            "%d workers with the in-memory store: each keeps 1/%d of every limit and backend",
            workers,
            workers,
        )
    directory = Path(tempfile.mkdtemp(prefix="kvgate-workers-"))

    def worker(index: int) -> None:
        group = Group(directory, index, workers)
        runner(_run(policy, config.resolve(), digest, listen, demo=False, group=group))

    try:
        return supervise(workers, worker, policy.server.grace_period_s)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _run(
    policy: Policy,
    config: Path,
    digest: bytes,
    listen: tuple[str, int],
    *,
    demo: bool,
    group: Group | None = None,
) -> None:
    from gateway.app import build_app, worker_metrics_app

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    if demo:
        runners.append(await _start_simulator(policy))
    workers = 1 if group is None else group.workers
    app = build_app(policy, watch=(config, digest), workers=workers, group=group)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=policy.server.grace_period_s,
        access_log=None,
    )
    await runner.setup()
    await web.TCPSite(
        runner, listen[0], listen[1], backlog=1024, reuse_port=group is not None or None
    ).start()
    if group is not None:
        own = web.AppRunner(worker_metrics_app(app), access_log=None)
        await own.setup()
        path = group.socket_of(group.index)
        path.unlink(missing_ok=True)
        await web.UnixSite(own, str(path)).start()
        runners.append(own)
    # Each request allocates a few hundred short-lived objects, so the default gen-0 threshold
    # (700) runs the cycle collector every few requests over the whole young heap; the request
    # path makes no cycles worth chasing that often. Startup objects are frozen out of it.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    runners.insert(0, runner)
    url = f"http://{listen[0]}:{listen[1]}"
    logging.getLogger("kvgate").info(
        "kvgate listening on %s with policy %s (%s)", url, config, policy.fingerprint
    )
    if demo:
        _print_demo(url, policy)
    try:
        await stop.wait()
    finally:
        for r in runners:
            await r.cleanup()


async def _start_simulator(policy: Policy) -> web.AppRunner:
    from urllib.parse import urlsplit

    from gateway.sim.config import SimConfig
    from gateway.sim.server import build_app as build_sim

    model = next(iter(policy.models.values()))
    target = urlsplit(model.backends[0].url)
    config = SimConfig(model=model.name, kv_bytes_per_token=model.profile.kv_bytes_per_token)
    runner = web.AppRunner(build_sim(config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, target.hostname or "127.0.0.1", target.port or 80).start()
    return runner


def _print_demo(url: str, policy: Policy) -> None:
    model = next(iter(policy.models))
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 32,
            "stream": True,
        }
    )
    print(
        f"\nkvgate demo: a simulated GPU serving {model!r} behind kvgate at {url}\n"
        f"Try:\n  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{body}'\n"
        f"Metrics: {url}/metrics   State: {url}/admin/state   Stop: Ctrl-C\n",
        flush=True,
    )
