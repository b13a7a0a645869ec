"""Composition root: builds the live state from a policy, the aiohttp application with its routes,
and the background work (upstream connections, backend monitors, policy watcher) as cleanup contexts
that start with the app and are cancelled and awaited when it stops.

The proxy app serves the API and the probes only; everything internal (metrics, state, reload,
the status page) is on the admin app (``gateway.admin.build_admin_app``), on its own listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.admin import CONTROL, GROUP, Control, healthz, readyz
from gateway.backends.admitter import Admitter
from gateway.backends.shared import SharedLink
from gateway.core.clock import Clock, MonotonicClock
from gateway.core.tokens import (
    TokenCounter,
    TokenizerUnavailable,
    tiktoken_counter,
    tokenizer_json_counter,
)
from gateway.core.types import Outcome
from gateway.errors import PolicyError
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.policy.compile import Model, Policy
from gateway.policy.schema import RedisStore
from gateway.policy.watcher import PolicyWatcher
from gateway.proxy import responses
from gateway.proxy.connections import ConnectionGuard
from gateway.proxy.exchange import handle
from gateway.proxy.headers import api_key
from gateway.state import GATEWAY, Gateway, Live
from gateway.store.base import LimitStore
from gateway.store.fallback import FallbackLimitStore
from gateway.store.memory import MemoryLimitStore
from gateway.store.redis import RedisLimitStore
from gateway.store.reservations import RedisReservations
from gateway.store.scaled import ScaledLimitStore
from gateway.tracing import RequestTracer, otlp_tracer
from gateway.workers import Group

log = logging.getLogger("kvgate")

_WATCH = web.AppKey("watch", tuple)
CONNECTIONS = web.AppKey("connections", ConnectionGuard)
_WORKERS = web.AppKey("workers", int)


def build_app(
    policy: Policy,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    watch: tuple[Path, bytes] | None = None,
    tracer: RequestTracer | None = None,
    workers: int = 1,
    group: Group | None = None,
) -> web.Application:
    """The gateway as an aiohttp app; ``watch`` = (policy file, digest of its text) hot-reloads;
    ``tracer`` replaces the OTLP one ``server.tracing`` asks for (tests use an in-memory one);
    ``workers``: processes of this replica (what is not shared through Redis is split in that
    many shares, ``gateway.workers``); ``group``: its worker group, whose metrics the admin
    listener's /metrics merges."""
    clock = clock or MonotonicClock()
    metrics = metrics or Metrics()
    gw = Gateway(
        live=build_live(policy, clock, None, workers),
        admitter=Admitter(
            policy.admission,
            clock,
            shared=build_shared(policy, metrics, workers),
            share=1.0 if policy.shared is not None else 1.0 / workers,
        ),
        metrics=metrics,
        clock=clock,
    )
    metrics.set_policy(policy.fingerprint)
    metrics.watch_admission(gw.admitter.snapshot)
    guard = ConnectionGuard(
        policy.server.connections,
        refused=lambda reason: metrics.connections_refused.labels(reason).inc(),
        timed_out=lambda phase: metrics.connections_timed_out.labels(phase).inc(),
    )
    app = web.Application(client_max_size=policy.server.max_body_bytes)
    app[GATEWAY] = gw
    app[CONTROL] = Control()
    app[CONNECTIONS] = guard
    app[_WORKERS] = workers
    if group is not None:
        app[GROUP] = group
    if watch is not None:
        app[_WATCH] = watch
    if policy.spec.server.access_log:
        gw.access = AccessLog()
    tracing = policy.spec.server.tracing
    if tracer is None and tracing.enabled:
        tracer = otlp_tracer(tracing.service_name, policy.source)
    gw.tracer = tracer
    app.cleanup_ctx.extend([_upstream_connections, _admitter, _policy_watcher, _access_log, _drain])
    # the probes stay here too, for load balancers that only reach the proxy port
    # every handler runs inside the connection guard (``ConnectionGuard.wrap``)
    app.router.add_get("/healthz", guard.wrap(healthz))
    app.router.add_get("/readyz", guard.wrap(readyz))
    app.router.add_get("/v1/models", guard.wrap(_models))
    for internal in ("/metrics", "/status", "/admin/{tail:.*}"):  # answered before any key check
        app.router.add_route("*", internal, guard.wrap(_not_here))
    app.router.add_route("*", "/{tail:.*}", guard.wrap(handle))
    return app


def build_live(policy: Policy, clock: Clock, previous: Live | None, workers: int = 1) -> Live:
    """The store and token counters for ``policy``; reuses the previous store when its
    configuration did not change, so bucket state survives a reload."""
    if previous is not None and previous.policy.spec.store == policy.spec.store:
        store = previous.store
    else:
        store = build_store(policy, clock, workers)
    counters = {name: _counter(m, policy.source) for name, m in policy.models.items()}
    return Live(policy=policy, store=store, counters=counters)


def build_store(policy: Policy, clock: Clock, workers: int = 1) -> LimitStore:
    """The policy's limit store; with ``workers`` > 1, a memory store keeps this worker's
    share and a Redis one falls back to a share of every worker of every replica."""
    spec = policy.spec.store
    local = MemoryLimitStore(clock)
    if not isinstance(spec, RedisStore):
        return local if workers == 1 else ScaledLimitStore(local, 1.0 / workers)
    return FallbackLimitStore(
        RedisLimitStore(spec.url, prefix=spec.prefix),
        local,
        spec.on_error,
        replicas=spec.replicas * workers,
    )


def build_shared(policy: Policy, metrics: Metrics, workers: int = 1) -> SharedLink | None:
    """The link to shared reservations the policy's ``admission.shared`` asks for, if any.
    Changing it takes a restart: a reload keeps the link the process started with."""
    s = policy.shared
    if s is None:
        return None
    replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    store = RedisReservations(
        s.url, replica, prefix=s.prefix, lease_s=s.lease_s, timeout_s=s.timeout_s
    )
    return SharedLink(
        store,
        replicas=s.replicas * workers,
        refresh_s=s.refresh_s,
        on_switch=metrics.shared_admission_switched,
    )


def _counter(model: Model, source: str) -> TokenCounter | None:
    """The exact token counter a model's policy names; a missing package or file is a policy
    error at load time, not a failure on the first request."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        return None
    where = f"models.{model.name}.tokenizer"
    try:
        if tokenizer.tiktoken is not None:
            return tiktoken_counter(tokenizer.tiktoken)
        return tokenizer_json_counter(Path(str(tokenizer.file)).read_text(encoding="utf-8"))
    except (OSError, ValueError, TokenizerUnavailable) as exc:
        raise PolicyError(source, f"at $.{where}: {exc}") from exc


async def apply_policy(app: web.Application, policy: Policy) -> None:
    """Swap in a new policy whole; requests in flight finish on the one they started with."""
    gw = app[GATEWAY]
    old = gw.live
    live = await asyncio.to_thread(build_live, policy, gw.clock, old, app[_WORKERS])
    gw.admitter.reconfigure(policy.admission)
    gw.live = live
    gw.metrics.set_policy(policy.fingerprint)
    if live.store is not old.store:
        await old.store.close()


async def _upstream_connections(app: web.Application) -> AsyncIterator[None]:
    upstreams = app[GATEWAY].upstreams
    async with _running(upstreams.sweep()):
        yield
    upstreams.close()


async def _admitter(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    await gw.admitter.start()
    yield
    await gw.admitter.close()
    await gw.live.store.close()
    if gw.tracer is not None:
        await asyncio.to_thread(gw.tracer.shutdown)  # flushes what is batched


async def _policy_watcher(app: web.Application) -> AsyncIterator[None]:
    if _WATCH not in app:
        yield
        return
    path, digest = app[_WATCH]
    gw = app[GATEWAY]

    async def apply(policy: Policy) -> None:
        await apply_policy(app, policy)

    def report(result: str) -> None:
        gw.metrics.policy_reloads.labels(result).inc()

    watcher = PolicyWatcher(path, digest, apply, report, running=gw.live.policy)
    app[CONTROL].watcher = watcher
    async with _running(watcher.run()):
        yield
    app[CONTROL].watcher = None


async def _access_log(app: web.Application) -> AsyncIterator[None]:
    access = app[GATEWAY].access
    if access is None:
        yield
        return
    async with _running(access.run()):
        yield


@contextlib.asynccontextmanager
async def _running(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """``work`` as a task for the app's lifetime: cancelled and awaited when it stops."""
    task = asyncio.get_running_loop().create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _drain(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[GATEWAY].drain()


async def _not_here(request: web.Request) -> web.Response:
    """What a scraper gets that still points at the proxy port: a plain 404, no internals."""
    message = f"{request.path} is not served on this port (it is on the admin listener)."
    return web.json_response(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "not_found",
            }
        },
        status=404,
    )


async def _models(request: web.Request) -> web.Response:
    """The models the caller's key may use, as OpenAI lists them (a tenant limited to some
    models does not learn the others' names)."""
    policy = request.app[GATEWAY].live.policy
    tenant = policy.tenant_for_key(api_key(request.headers))
    if tenant is None:
        return responses.error(Outcome.UNAUTHORIZED, responses.BAD_KEY)
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "kvgate",
            "max_model_len": m.profile.context_tokens,
        }
        for name, m in policy.models.items()
        if tenant.models is None or name in tenant.models
    ]
    return web.json_response({"object": "list", "data": data})
