"""The admin listener: what only operators and Prometheus may see, on its own address (loopback by
default). ``/metrics``, ``/admin/state`` (JSON), ``/status`` (the same as a page that refreshes
itself), ``POST /admin/reload`` and the probes ``/healthz`` and ``/readyz``.

``POST /admin/reload`` reloads the file now and answers the outcome: 200 with ``result`` "ok",
"unchanged" or "restart_required" and the fingerprint serving after it, 422 with ``result``
"error" and the error (the previous policy keeps serving), 409 without a file to reload.

Under ``kvgate run --workers N`` every worker binds the admin port too, with SO_REUSEPORT as on
the proxy port, so whichever worker is alive answers for the whole group: it asks the others
on their private sockets (``worker_app``, ``gateway.workers.Group``). /metrics is one page with
each sample labelled ``worker``; /admin/state is ``{"answered_by": "0", "workers": {"0": STATE,
"1": STATE}}`` with each worker's own state as one process answers it (null: that worker did
not answer, e.g. restarting); /admin/reload reloads every worker and answers ``{"workers":
{"0": RESULT, ...}}``, 422 if any failed (a restarting worker, null, reads the file as it
starts). The status page shows every worker's rows, labelled.

Bound anywhere but loopback the policy must name a token (``server.admin.token``); every path
then asks for it as ``Authorization: Bearer <token>``, or as the password of HTTP Basic (what a
browser can send for the status page, after asking once). The token is read from the live
policy, so a reload can rotate it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import importlib.resources
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.core.bucket import BucketSpec
from gateway.errors import StoreError
from gateway.policy.compile import Policy, store_kind
from gateway.policy.watcher import PolicyWatcher
from gateway.state import GATEWAY, Gateway
from gateway.workers import Group

_REALM = 'realm="kvgate admin"'
_RELOAD_TIMEOUT_S = 30.0  # a worker's reload reads, validates and applies the file
# the probes answer anyone, as on the proxy port: an orchestrator probes without a token
_OPEN = frozenset({"/healthz", "/readyz"})


@dataclass(slots=True)
class Control:
    """What the process around the app sets while it runs: the policy watcher (for the reload
    trigger) and whether it is draining (``/readyz`` then fails, on both listeners)."""

    watcher: PolicyWatcher | None = None
    draining: bool = False


CONTROL = web.AppKey("control", Control)
GROUP = web.AppKey("group", Group)  # set on the proxy app of a worker of ``--workers N``
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_admin_app(proxy: web.Application) -> web.Application:
    """The admin app of the gateway ``proxy`` (built by ``gateway.app.build_app``), serving the
    same live state; it runs on a listener of its own and is started after ``proxy``."""
    app = web.Application(middlewares=[_authorized])
    app[GATEWAY] = proxy[GATEWAY]
    app[CONTROL] = proxy[CONTROL]
    if GROUP in proxy:
        app[GROUP] = proxy[GROUP]
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/state", _state)
    app.router.add_post("/admin/reload", _reload)
    app.router.add_get("/status", _status)
    app.router.add_get("/", _index)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the policy is loaded, the process is not draining and a backend is ready. With
    ``?scope=gateway`` the backends are not asked: the probe for a load balancer in front of
    gateways that share their model servers, which should keep every gateway in service while
    the servers load (requests then wait in the gateway's queue, or get 503 + Retry-After)."""
    gw = request.app[GATEWAY]
    fingerprint = gw.live.policy.fingerprint
    if request.app[CONTROL].draining:
        return web.json_response({"status": "draining", "policy": fingerprint}, status=503)
    backends = gw.admitter.any_ready()
    ready = backends or request.query.get("scope") == "gateway"
    body = {
        "status": "ready" if ready else "no backend ready",
        "backend_ready": backends,
        "policy": fingerprint,
    }
    return web.json_response(body, status=200 if ready else 503)


@web.middleware
async def _authorized(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[GATEWAY].live.policy.server.admin.token
    if token is None or request.path in _OPEN or _presented(request, token):
        return await handler(request)
    return web.json_response(
        {"error": "the admin listener needs its token: Authorization: Bearer <token>"},
        status=401,
        # one challenge a header: browsers read Basic (and then ask) only from its own
        headers=CIMultiDict(
            [("WWW-Authenticate", f"Basic {_REALM}"), ("WWW-Authenticate", f"Bearer {_REALM}")]
        ),
    )


def _presented(request: web.Request, token: str) -> bool:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), token.encode())


def _parsed(answer: str | None) -> object:
    """A worker's JSON answer; None for none, or for one that is not JSON."""
    if answer is None:
        return None
    try:
        return json.loads(answer)
    except ValueError:
        return None


async def _metrics(request: web.Request) -> web.Response:
    body = _own_metrics(request.app[GATEWAY])
    if GROUP in request.app:
        body = (await request.app[GROUP].metrics(body.decode())).encode()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _own_metrics(gw: Gateway) -> bytes:
    gw.metrics.store_degraded.set(1 if gw.live.store.degraded else 0)
    gw.metrics.asyncio_tasks.set(len(asyncio.all_tasks()))
    return generate_latest(gw.metrics.registry)


def worker_app(proxy: web.Application) -> web.Application:
    """This worker's own /metrics, /admin/state and POST /admin/reload, on its private Unix
    socket, for the worker answering the admin port to gather (no token: only the group's
    directory reaches it)."""
    own = web.Application()
    own[GATEWAY] = proxy[GATEWAY]
    own[CONTROL] = proxy[CONTROL]
    own.router.add_get("/metrics", _metrics)
    own.router.add_get("/admin/state", _state)
    own.router.add_post("/admin/reload", _reload)
    return own


async def _state(request: web.Request) -> web.Response:
    own = await _own_state(request.app)
    if GROUP not in request.app:
        return web.json_response(own)
    group = request.app[GROUP]
    answers = await group.gather("GET", "/admin/state", json.dumps(own))
    workers = {w: _parsed(a) for w, a in answers.items()}
    return web.json_response({"answered_by": str(group.index), "workers": workers})


async def _own_state(app: web.Application) -> dict[str, object]:
    gw = app[GATEWAY]
    policy = gw.live.policy
    return {
        "policy": {"source": policy.source, "fingerprint": policy.fingerprint},
        "draining": app[CONTROL].draining,
        "store": {"kind": store_kind(policy), "degraded": gw.live.store.degraded},
        "admission": gw.admitter.snapshot(),
        "limits": await _limits(gw),
    }


async def _limits(gw: Gateway) -> dict[str, list[dict[str, object]]]:
    """Every bucket of the policy by owner ("tenant acme", "model m1"): its words, unit, burst
    and level now (None when the store cannot tell)."""
    policy = gw.live.policy
    specs = _all_buckets(policy)
    levels: tuple[float | None, ...]
    try:
        levels = tuple(await gw.live.store.peek(specs)) if specs else ()
    except StoreError:
        levels = (None,) * len(specs)
    out: dict[str, list[dict[str, object]]] = {}
    for spec, level in zip(specs, levels, strict=True):
        words = policy.limit_words(spec.key)
        owner = words.partition("'s ")[0]
        out.setdefault(owner, []).append(
            {
                "limit": words,
                "unit": spec.unit.value,
                "burst": spec.burst,
                "level": None if level is None else max(0.0, level),
            }
        )
    return out


def _all_buckets(policy: Policy) -> list[BucketSpec]:
    seen: dict[str, BucketSpec] = {}
    for tenant in policy.tenants:
        for model in policy.models:
            for spec in policy.buckets(tenant, model):
                seen.setdefault(spec.key, spec)
    return list(seen.values())


async def _reload(request: web.Request) -> web.Response:
    watcher = request.app[CONTROL].watcher
    if watcher is None:
        return web.json_response(
            {"error": "this gateway was started without a policy file to reload"}, status=409
        )
    outcome, error = await watcher.reload()
    own: dict[str, object] = {
        "result": outcome,
        "policy": request.app[GATEWAY].live.policy.fingerprint,
    }
    if error is not None:
        own["error"] = error
    if GROUP not in request.app:
        return web.json_response(own, status=422 if outcome == "error" else 200)
    answers = await request.app[GROUP].gather(
        "POST", "/admin/reload", json.dumps(own), _RELOAD_TIMEOUT_S
    )
    workers = {w: _parsed(a) for w, a in answers.items()}
    failed = any(isinstance(r, dict) and r.get("result") == "error" for r in workers.values())
    return web.json_response({"workers": workers}, status=422 if failed else 200)


_PAGE = importlib.resources.files("gateway").joinpath("status.html").read_bytes()


async def _status(request: web.Request) -> web.Response:
    return web.Response(
        body=_PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def _index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/status")
