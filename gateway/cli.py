"""``kvgate run | validate | schema | explain | demo`` (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import importlib.resources
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from gateway import __version__, logs
from gateway.core.clock import MonotonicClock
from gateway.core.cost import ContextOverflowError, estimate
from gateway.errors import PolicyError
from gateway.policy import schema
from gateway.policy.compile import Policy, compile_policy, store_kind
from gateway.policy.units import excerpt
from gateway.policy.watcher import read_policy
from gateway.proxy.apis.common import BadRequestBody
from gateway.proxy.apis.routes import parse_request
from gateway.proxy.connections import ConnectionGuard, GuardedSite

if TYPE_CHECKING:
    from gateway.workers import Group

# ``kvgate demo``'s ports: clear of what model servers and their neighbours listen on by default
# (vLLM 8000, llama-server and TGI 8080, SGLang 30000, Ollama 11434, LM Studio 1234, LiteLLM
# 4000, Grafana 3000, Prometheus 9090), so the demo starts next to a real one.
DEMO_PORT, DEMO_BACKEND_PORT, DEMO_ADMIN_PORT = 4080, 4081, 4082


@dataclass(frozen=True, slots=True)
class Listen:
    """Where to serve: the proxy and the admin listener."""

    host: str
    port: int
    admin_host: str
    admin_port: int


class PortInUse(Exception):
    def __init__(self, host: str, port: int, flag: str) -> None:
        super().__init__(
            f"{host}:{port} is already in use (another kvgate, or a model server?); "
            f"stop it or pass {flag} PORT"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve with a policy file (hot-reloaded on change or SIGHUP)")
    run.add_argument("-c", "--config", type=Path, help="default: the bundled demo policy")
    run.add_argument("--host", help="listen here instead of the policy's server.host")
    run.add_argument("--port", type=int, help="listen here instead of the policy's server.port")
    run.add_argument("--admin-host", help="the admin listener's address instead of the policy's")
    run.add_argument(
        "--admin-port", type=int, help="the admin listener's port instead of the policy's"
    )
    run.add_argument(
        "--workers",
        type=int,
        help="worker processes on the port and the admin port (SO_REUSEPORT); default: one per "
        "core with a Redis store, 1 with the in-memory one (where each of N workers keeps 1/N "
        "of every limit and backend)",
    )
    validate = sub.add_parser(
        "validate", help="check policy files, reporting every error; exit 1 if any has one"
    )
    validate.add_argument("files", type=Path, nargs="+")
    validate.add_argument(
        "--offline",
        action="store_true",
        help="check `env:` references without reading them (CI, without production secrets)",
    )
    sub.add_parser("schema", help="print the policy's JSON Schema (for editors and linters)")
    explain = sub.add_parser("explain", help="show a request's cost and the limits that apply")
    explain.add_argument("-c", "--config", type=Path, help="default: the bundled demo policy")
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--path", default="/v1/chat/completions")
    explain.add_argument("request", type=Path, help="the request body, as JSON")
    demo = sub.add_parser("demo", help="a simulated GPU backend and the gateway, ready for curl")
    demo.add_argument("-c", "--config", type=Path, default=None)
    demo.add_argument("--port", type=int, default=DEMO_PORT, help=f"the gateway's ({DEMO_PORT})")
    demo.add_argument(
        "--backend-port",
        type=int,
        default=DEMO_BACKEND_PORT,
        help=f"the simulated GPU's ({DEMO_BACKEND_PORT}); the policy's first backend moves here",
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        default=DEMO_ADMIN_PORT,
        help=f"the admin listener's: metrics and the status page ({DEMO_ADMIN_PORT})",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args.files, offline=args.offline)
        if args.command == "schema":
            sys.stdout.write(_json_schema())
            return 0
        if args.command == "explain":
            body = args.request.read_bytes()
            config = args.config or _bundled_policy()
            return asyncio.run(_explain(config, args.tenant, args.path, args.request, body))
        if args.command == "demo":
            return _demo(args.config or _bundled_policy(), args)
        config = args.config or _bundled_policy()
        return _serve(config, args)
    except (PolicyError, PortInUse) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 1


def _validate(files: list[Path], *, offline: bool) -> int:
    status = 0
    for path in files:
        try:
            policy, _ = read_policy(path, offline=offline)
        except PolicyError as exc:
            print(f"{exc}", file=sys.stderr)
            status = 1
            continue
        except Exception as exc:  # a bug must read as one line, never as a traceback
            print(
                f"{path}: could not be checked ({type(exc).__name__}: {excerpt(str(exc))}); "
                "this is a kvgate bug, please report it",
                file=sys.stderr,
            )
            status = 1
            continue
        mode = ", secrets not read" if offline else ""
        print(f"{path}: ok (fingerprint {policy.fingerprint}{mode})")
    return status


def _json_schema() -> str:
    document = msgspec.json.schema(schema.Policy)
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kvgate policy",
        **document,
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


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


def _serve(config: Path, args: argparse.Namespace) -> int:
    policy, digest = read_policy(config)
    server = policy.server
    listen = Listen(
        host=args.host or server.host,
        port=server.port if args.port is None else args.port,
        admin_host=args.admin_host or server.admin.host,
        admin_port=server.admin.port if args.admin_port is None else args.admin_port,
    )
    workers = args.workers
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if store_kind(policy) == "redis" else 1
    if workers < 1:
        raise PolicyError("--workers", f"must be at least 1, got {workers}")
    runner = _loop_runner()
    watch = (config.resolve(), digest)
    if workers == 1:
        runner(_run(policy, listen, watch=watch, demo=False))
        return 0
    return _supervise(policy, listen, watch, workers, runner)


def _supervise(
    policy: Policy,
    listen: Listen,
    watch: tuple[Path, bytes],
    workers: int,
    runner: Callable[[Coroutine[Any, Any, None]], None],
) -> int:
    """``workers`` processes, each the whole gateway with both listeners (SO_REUSEPORT)."""
    from gateway.workers import Group, supervise

    # a port taken by another program would fail every worker, restarted forever: say it once
    _check_free(listen.host, listen.port, "--port")
    _check_free(listen.admin_host, listen.admin_port, "--admin-port")
    if store_kind(policy) == "memory":
        logging.getLogger("kvgate").warning(
            "%d workers with the in-memory store: each keeps 1/%d of every limit and backend",
            workers,
            workers,
        )
    directory = Path(tempfile.mkdtemp(prefix="kvgate-workers-"))
    supervisor = os.getpid()

    def worker(index: int) -> None:
        group = Group(directory, index, workers)
        try:
            runner(_run(policy, listen, watch=watch, demo=False, group=group))
        finally:
            if os.getppid() != supervisor:
                # the supervisor died (SIGKILL: its cleanup never ran); the last worker out
                # removes the group's directory
                group.socket_of(index).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    directory.rmdir()

    try:
        # each worker fails readiness for drain_delay on SIGTERM before it drains
        grace = policy.server.grace_period_s + policy.server.drain_delay_s
        return supervise(workers, worker, grace)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check_free(host: str, port: int, flag: str) -> None:
    """Raise ``PortInUse`` unless the workers can bind ``host:port`` with SO_REUSEPORT."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # the workers report it
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(host, port, flag) from None
            raise


def _demo(config: Path, args: argparse.Namespace) -> int:
    """The policy's first model served by a simulated GPU on ``--backend-port``; not reloaded
    on change (the file names another backend address)."""
    policy, _ = read_policy(config)
    spec = policy.spec
    name, model = next(iter(spec.models.items()))
    backend = msgspec.structs.replace(
        model.backends[0], url=f"http://127.0.0.1:{args.backend_port}"
    )
    model = msgspec.structs.replace(model, backends=[backend, *model.backends[1:]])
    spec = msgspec.structs.replace(spec, models={**spec.models, name: model})
    policy = compile_policy(spec, policy.source)
    listen = Listen(
        host=policy.server.host,
        port=args.port,
        admin_host=policy.server.admin.host,
        admin_port=args.admin_port,
    )
    _loop_runner()(_run(policy, listen, watch=None, demo=True))
    return 0


def _loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    logs.configure()
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


async def _run(
    policy: Policy,
    listen: Listen,
    *,
    watch: tuple[Path, bytes] | None,
    demo: bool,
    group: Group | None = None,
) -> None:
    """The gateway's listeners until a signal; ``group``: this process is one worker of
    ``--workers N`` and shares both ports with the others (SO_REUSEPORT)."""
    from gateway.admin import CONTROL, build_admin_app, worker_app
    from gateway.app import CONNECTIONS, build_app

    log = logging.getLogger("kvgate")
    stop = asyncio.Event()
    terminated = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM (an orchestrator) fails readiness first, so load balancers stop sending before the
    # listener closes; SIGINT (a person at the terminal), or a second signal, stops at once.
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(
            signal.SIGTERM, lambda: stop.set() if terminated.is_set() else terminated.set()
        )
    runners: list[web.AppRunner] = []
    try:
        if demo:
            runners.append(await _start_simulator(policy))
        workers = 1 if group is None else group.workers
        app = build_app(policy, watch=watch, workers=workers, group=group)
        shared_port = group is not None
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            shutdown_timeout=policy.server.grace_period_s,
            access_log=None,
        )
        await runner.setup()
        runners.insert(0, runner)
        await _listen(
            runner,
            listen.host,
            listen.port,
            "--port",
            guard=app[CONNECTIONS],
            reuse_port=shared_port,
        )
        admin = web.AppRunner(build_admin_app(app), access_log=None)
        await admin.setup()
        runners.insert(0, admin)
        await _listen(
            admin, listen.admin_host, listen.admin_port, "--admin-port", reuse_port=shared_port
        )
        if group is not None:
            own = web.AppRunner(worker_app(app), access_log=None)
            await own.setup()
            runners.append(own)
            path = group.socket_of(group.index)
            path.unlink(missing_ok=True)  # left by this worker's previous life
            await web.UnixSite(own, str(path)).start()
        # Each request allocates a few hundred short-lived objects, so the default gen-0
        # threshold (700) runs the cycle collector every few requests over the whole young heap;
        # the request path makes no cycles worth chasing that often. Startup objects are frozen
        # out of it.
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        url = f"http://{listen.host}:{listen.port}"
        admin_url = f"http://{listen.admin_host}:{listen.admin_port}"
        log.info(
            "kvgate %s listening on %s (admin on %s) with policy %s (%s)",
            __version__,
            url,
            admin_url,
            policy.source,
            policy.fingerprint,
        )
        if demo:
            _print_demo(url, admin_url, policy)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait(
            [stopping, asyncio.ensure_future(terminated.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        delay = policy.server.drain_delay_s
        if not stop.is_set() and delay > 0:
            app[CONTROL].draining = True
            log.info("SIGTERM: /readyz fails for %gs, then the listener closes and drains", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping, delay)
        stopping.cancel()
    finally:
        for r in runners:
            await r.cleanup()


async def _listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    flag: str,
    guard: ConnectionGuard | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    """Listen; the proxy's listener is guarded (connection caps and deadlines), the admin one
    serves operators only; ``reuse_port``: shared with the other workers of a group."""
    site: web.BaseSite
    if guard is None:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    else:
        site = GuardedSite(runner, host, port, guard, backlog=1024, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port, flag) from None
        raise


async def _start_simulator(policy: Policy) -> web.AppRunner:
    from urllib.parse import urlsplit

    from gateway.sim.config import SimConfig
    from gateway.sim.server import build_app as build_sim

    model = next(iter(policy.models.values()))
    target = urlsplit(model.backends[0].url)
    config = SimConfig(model=model.name, kv_bytes_per_token=model.profile.kv_bytes_per_token)
    runner = web.AppRunner(build_sim(config), access_log=None)
    await runner.setup()
    try:
        await _listen(runner, target.hostname or "127.0.0.1", target.port or 80, "--backend-port")
    except PortInUse:
        await runner.cleanup()
        raise
    return runner


def _print_demo(url: str, admin_url: str, policy: Policy) -> None:
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
        f"Status page: {admin_url}/status   Metrics: {admin_url}/metrics   Stop: Ctrl-C\n",
        flush=True,
    )
