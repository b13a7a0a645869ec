"""The request path: tenant → body → cost → buckets → admission → forward → settle.

Each step is one module; this one orders them and turns refusals into responses. The live state
is read once per request, so a policy reload never changes it under a request in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import msgspec
from aiohttp import web

from gateway.backends.admitter import Lease, Shed, Ticket
from gateway.core.backend import MemoryKind
from gateway.core.cost import ContextOverflowError, Cost, Holding, actual_cost, estimate
from gateway.core.types import Outcome, Priority
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.logs import AccessRecord
from gateway.policy.compile import Backend, Model, Policy, Tenant
from gateway.proxy import responses
from gateway.proxy.body import (
    BadRequestBody,
    ParsedRequest,
    endpoint_of,
    model_of,
    parse_request,
    with_usage_requested,
)
from gateway.proxy.forward import Relay, forward
from gateway.proxy.headers import upstream_headers
from gateway.proxy.limits import Charge, charge, ratelimit_headers, settle
from gateway.state import GATEWAY, Gateway, Live

# A request on a path without cost rules (no prompt to read) costs one request and no memory.
_PLAIN_COST = Cost(
    requests=1, input_tokens=0, output_tokens=0, kv_bytes=0, kv_gib_seconds=0.0, price=0.0
)


@dataclasses.dataclass(slots=True)
class _Exchange:
    """What one request did, for settlement, metrics and the access log."""

    tenant: Tenant
    model: Model
    started: float
    outcome: Outcome = Outcome.OK
    status: int = 0
    queued_s: float = 0.0
    backend: Backend | None = None  # the one that served it
    sequences: int = 1  # output sequences (n x prompts) the output tokens are spread over
    relay: Relay = dataclasses.field(default_factory=Relay)


async def proxy(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    live = gw.live
    policy = live.policy
    started = gw.clock.now()
    tenant = _authenticate(request, policy)
    if tenant is None:
        message = "Invalid or missing API key: send `Authorization: Bearer <key>` or `api-key`."
        return _refused(gw, None, None, responses.error(Outcome.UNAUTHORIZED, message))
    body = await _read_body(request)
    if body is None or len(body) > policy.server.max_body_bytes:
        limit = policy.server.max_body_bytes
        message = f"Request body is larger than this gateway's limit of {limit} bytes."
        refusal = responses.error(Outcome.TOO_LARGE, message, should_retry=False)
        return _refused(gw, tenant, None, refusal)
    parsed: ParsedRequest | None = None
    model_name: str | None = None
    if request.method == "POST" and endpoint_of(request.path) is not None:
        try:
            parsed = parse_request(body, request.path)
        except BadRequestBody as exc:
            refusal = responses.error(
                Outcome.BAD_REQUEST, exc.message, param=exc.param, should_retry=False
            )
            return _refused(gw, tenant, None, refusal)
        model_name = parsed.model
    elif body:
        model_name = model_of(body)
    model_name = model_name or policy.server.fallback_model
    model = policy.models.get(model_name) if model_name is not None else None
    if model is None:
        return _refused(gw, tenant, None, _not_found(request, policy, model_name))
    try:
        cost = _PLAIN_COST
        if parsed is not None:
            cost = estimate(parsed, model.profile, live.counters.get(model.name))
    except ContextOverflowError as exc:
        refusal = responses.error(
            Outcome.BAD_REQUEST,
            str(exc),
            code="context_length_exceeded",
            param="messages",
            should_retry=False,
        )
        return _refused(gw, tenant, model, refusal)

    held = await charge(
        live.store,
        policy.buckets(tenant.name, model.name),
        cost,
        orphaned=lambda charged: _settle_charge(gw, live, charged, None),
    )
    headers = ratelimit_headers(held)
    verdict = held.verdict
    if not verdict.allowed:
        if verdict.store_error:
            message = "The shared limit store is unreachable and this gateway fails closed."
            refusal = responses.error(
                Outcome.STORE_ERROR, message, retry_after_s=1.0, headers=headers
            )
            return _refused(gw, tenant, model, refusal)
        if not tenant.shadow:
            return _refused(gw, tenant, model, _rate_refusal(held, headers))
        gw.metrics.count(tenant.name, model.name, Outcome.SHADOW_LIMITED.value)

    ex = _Exchange(tenant, model, started)
    if parsed is not None:
        ex.sequences = parsed.n * parsed.prompts
    try:
        response = await _admit_and_forward(request, gw, ex, cost, body, parsed, headers, held)
    except asyncio.CancelledError:
        ex.outcome = Outcome.CLIENT_CLOSED
        raise
    finally:
        _settle(gw, live, ex, held, cost, gw.clock.now())
    return response


async def _admit_and_forward(
    request: web.Request,
    gw: Gateway,
    ex: _Exchange,
    cost: Cost,
    body: bytes,
    parsed: ParsedRequest | None,
    headers: dict[str, str],
    held: Charge,
) -> web.StreamResponse:
    policy = gw.live.policy
    ticket = Ticket(
        tenant=ex.tenant.name,
        model=ex.model.name,
        priority=_priority(request, ex.tenant),
        weight=ex.tenant.weight,
        prompt_tokens=cost.input_tokens,
        max_output_tokens=cost.output_tokens,
        kv_bytes_per_token=ex.model.profile.kv_bytes_per_token,
        deadline=ex.started + _max_wait(request, policy.max_wait_s),
        exclude=frozenset(),
    )
    strip_usage = parsed is not None and parsed.stream and not parsed.include_usage
    if strip_usage:
        body = with_usage_requested(body)
    while True:
        try:
            lease = await gw.admitter.acquire(ticket)
        except Shed as shed:
            ex.outcome = shed.outcome
            return responses.error(
                shed.outcome,
                shed.message,
                retry_after_s=shed.retry_after_s,
                should_retry=shed.should_retry,
                headers=headers,
            )
        ex.queued_s = lease.queued_s
        gw.metrics.timed(gw.metrics.queue_wait, ex.model.name, lease.queued_s)
        try:
            return await _forward(request, gw, ex, lease, body, strip_usage, headers)
        except UpstreamConnectError as exc:
            ticket = msgspec.structs.replace(ticket, exclude=ticket.exclude | {lease.backend_url})
            if len(ticket.exclude) >= len(ex.model.backends):
                ex.outcome = Outcome.UPSTREAM_ERROR
                return responses.error(ex.outcome, str(exc), headers=headers)
        except UpstreamTimeout as exc:
            ex.outcome = Outcome.UPSTREAM_TIMEOUT
            return responses.error(ex.outcome, str(exc), headers=headers)
        except UpstreamError as exc:
            ex.outcome = Outcome.UPSTREAM_ERROR
            return responses.error(ex.outcome, str(exc), headers=headers)


async def _forward(
    request: web.Request,
    gw: Gateway,
    ex: _Exchange,
    lease: Lease,
    body: bytes,
    strip_usage: bool,
    headers: dict[str, str],
) -> web.StreamResponse:
    backend = ex.backend = next(b for b in ex.model.backends if b.url == lease.backend_url)
    out_headers = upstream_headers(
        request.headers,
        peer=request.remote,
        scheme=request.scheme,
        backend_auth=backend.authorization,
    )
    relay = ex.relay = Relay()
    sent = gw.clock.now()
    failure: str | None = None
    try:
        response = await forward(
            request,
            _session(gw),
            backend.url,
            body=body,
            headers=out_headers,
            timeouts=gw.live.policy.server.timeouts,
            strip_usage=strip_usage,
            relay=relay,
            clock=gw.clock,
            extra_headers=headers,
            on_start=lease.started,
        )
    except UpstreamConnectError:
        failure = "connect"
        raise
    except asyncio.CancelledError:
        ex.outcome = Outcome.CLIENT_CLOSED
        raise
    finally:
        ttft = relay.first_token_at - sent if relay.first_token_at is not None else None
        if ttft is not None:
            gw.metrics.timed(gw.metrics.ttft, ex.model.name, ttft)
        lease.release(
            output_tokens=relay.output_tokens if relay.complete else None,
            ttft_s=ttft,
            failure=failure or relay.failure,
        )
    if relay.client_gone and not relay.complete:
        ex.outcome = Outcome.CLIENT_CLOSED
    elif not relay.complete and ex.outcome is Outcome.OK:
        ex.outcome = (
            Outcome.UPSTREAM_TIMEOUT if relay.failure == "timeout" else Outcome.UPSTREAM_ERROR
        )
    return response


def _settle(gw: Gateway, live: Live, ex: _Exchange, held: Charge, cost: Cost, ended: float) -> None:
    relay = ex.relay
    if ex.outcome is Outcome.OK and relay.status >= 500:
        ex.outcome = Outcome.UPSTREAM_ERROR
    actual: Cost | None = None
    if relay.status:
        input_tokens = relay.prompt_tokens if relay.prompt_tokens is not None else cost.input_tokens
        output_tokens = relay.output_tokens
        if output_tokens is None:
            output_tokens = cost.output_tokens if relay.complete else 0
        duration = ended - ex.started - ex.queued_s
        actual = actual_cost(
            ex.model.profile,
            input_tokens,
            output_tokens,
            duration,
            sequences=ex.sequences,
            holding=_holding(ex, cost, ended),
        )
        labels = (ex.tenant.name, ex.model.name)
        gw.metrics.settled(
            *labels, actual.input_tokens, actual.output_tokens, actual.kv_gib_seconds
        )
        gw.metrics.timed(gw.metrics.duration, ex.model.name, ended - ex.started)
    gw.metrics.count(ex.tenant.name, ex.model.name, ex.outcome.value)
    if gw.access is not None:
        gw.access.write(_access_record(ex, ended, relay.status, actual))
    _settle_charge(gw, live, held, actual)


def _settle_charge(gw: Gateway, live: Live, held: Charge, actual: Cost | None) -> None:
    """Settle the buckets against ``actual`` usage; None (the request went no further, its
    client left) refunds all but the request itself. A networked store settles meanwhile."""
    pending = settle(live.store, held, actual)
    if pending is not None:
        gw.spawn(pending)


def _holding(ex: _Exchange, cost: Cost, ended: float) -> Holding | None:
    """How the backend that served the request held its KV, for GiB·s."""
    backend = ex.backend
    if backend is None:
        return None
    relay = ex.relay
    decode_s = None
    if relay.streamed and relay.first_token_at is not None:
        decode_s = ended - relay.first_token_at
    return Holding(
        growing=backend.config.memory_kind is MemoryKind.PAGED,
        reserved_output_tokens=cost.output_tokens // max(1, ex.sequences),
        decode_s=decode_s,
    )


def _refused(
    gw: Gateway, tenant: Tenant | None, model: Model | None, response: web.Response
) -> web.Response:
    outcome = response.headers["x-kvgate-outcome"]
    tenant_name = tenant.name if tenant else "unknown"
    model_name = model.name if model else "unknown"
    gw.metrics.count(tenant_name, model_name, outcome)
    if gw.access is not None:
        gw.access.write(AccessRecord(tenant_name, model_name, response.status, outcome))
    return response


def _access_record(ex: _Exchange, ended: float, status: int, actual: Cost | None) -> AccessRecord:
    return AccessRecord(
        ex.tenant.name,
        ex.model.name,
        status,
        ex.outcome.value,
        backend=ex.backend.url if ex.backend else None,
        duration_s=round(ended - ex.started, 6),
        queued_s=round(ex.queued_s, 6),
        input_tokens=actual.input_tokens if actual is not None else None,
        output_tokens=actual.output_tokens if actual is not None else None,
        error=ex.relay.error,
    )


def _rate_refusal(held: Charge, headers: dict[str, str]) -> web.Response:
    verdict = held.verdict
    index = verdict.blocking if verdict.blocking is not None else 0
    spec = held.specs[index]
    unit = spec.unit.value
    if verdict.never:
        message = (
            f"This request needs {held.amounts[index]:.6g} {unit} but the limit {spec.key!r} "
            f"holds at most {spec.burst:.6g}: it can never pass. Make the request smaller."
        )
        return responses.error(
            Outcome.RATE_LIMITED, message, type_=unit, should_retry=False, headers=headers
        )
    message = (
        f"Rate limit reached for {unit} ({spec.key!r}: {spec.rate_per_s:.6g}/s, burst "
        f"{spec.burst:.6g}). Retry in {verdict.retry_after_s:.3f}s."
    )
    return responses.error(
        Outcome.RATE_LIMITED,
        message,
        type_=unit,
        retry_after_s=verdict.retry_after_s,
        headers=headers,
    )


def _authenticate(request: web.Request, policy: Policy) -> Tenant | None:
    auth = request.headers.get("Authorization")
    key = None
    if auth is not None and auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
    if not key:
        key = request.headers.get("api-key") or request.headers.get("x-api-key")
    if not key:
        return policy.anonymous
    return policy.tenant_for_key(key)


async def _read_body(request: web.Request) -> bytes | None:
    """The whole body, or None when it is longer than the app's ``client_max_size`` (the
    ``max_body`` the gateway started with; aiohttp stops reading there; a reloaded, smaller
    ``max_body`` is checked by the caller)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None


def _priority(request: web.Request, tenant: Tenant) -> Priority:
    """A request may lower its priority, or ask for one up to its tenant's band, never above."""
    asked = request.headers.get("x-kvgate-priority")
    if asked is None:
        return tenant.priority
    try:
        wanted = Priority.parse(asked.strip())
    except KeyError:
        return tenant.priority
    return max(wanted, tenant.priority)


def _max_wait(request: web.Request, max_wait: float) -> float:
    """The policy's queue ``max_wait``, or less when the client says so (``x-request-timeout``)."""
    asked = request.headers.get("x-request-timeout")
    if asked is None:
        return max_wait
    try:
        seconds = float(asked)
    except ValueError:
        return max_wait
    return min(max_wait, seconds) if seconds > 0 else max_wait


def _not_found(request: web.Request, policy: Policy, model_name: str | None) -> web.Response:
    if model_name is None:
        message = f"No route for {request.method} {request.path}: send a JSON body with a `model`."
        return responses.error(Outcome.NOT_FOUND, message, should_retry=False)
    known = ", ".join(sorted(policy.models))
    message = f"The model `{model_name}` does not exist here. Available: {known}."
    return responses.error(
        Outcome.NOT_FOUND, message, code="model_not_found", param="model", should_retry=False
    )


def _session(gw: Gateway) -> aiohttp.ClientSession:
    if gw.session is None:
        raise RuntimeError("the upstream session is opened at startup, before any request")
    return gw.session
