"""The request path, one object per request: authenticate → read and cost the body → charge
the buckets → admit → forward → settle.

``Exchange`` reads the gateway's live state (policy, store, token counters) once, when the
request arrives, and every step uses that snapshot: a policy reload swaps ``Gateway.live`` for
the requests that come after, never the deadline, timeouts or buckets of one already on its way.
Each step returns a refusal (an HTTP response) or lets the next one run; settlement runs
whatever happened after the charge, also when the client leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import msgspec
from aiohttp import web
from multidict import CIMultiDict

from gateway.backends.admitter import Lease, Shed
from gateway.core.backend import MemoryKind
from gateway.core.cost import (
    ContextOverflowError,
    Cost,
    Holding,
    actual_cost,
    estimate,
    sane_usage,
)
from gateway.core.pool import Ticket
from gateway.core.prefixes import CHUNK_BYTES, prompt_chain
from gateway.core.types import Outcome
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.logs import AccessRecord
from gateway.policy.compile import Backend, Model, Tenant
from gateway.proxy import responses
from gateway.proxy.apis import bounds, routes
from gateway.proxy.apis.common import BadRequestBody, ParsedRequest
from gateway.proxy.apis.openai import with_usage_requested
from gateway.proxy.failures import failure
from gateway.proxy.forward import Answer, Relay, forward
from gateway.proxy.headers import (
    api_key,
    asked_max_wait,
    asked_priority,
    request_id,
    upstream_headers,
)
from gateway.proxy.limits import (
    Charge,
    charge,
    charge_now,
    rate_refusal,
    ratelimit_headers,
    settle,
)
from gateway.proxy.usage import AnswerShape
from gateway.state import GATEWAY, Gateway

# Enum members read on every request, bound once: on Python 3.11 reading one off its class
# (``Outcome.OK``) goes through the enum metaclass's ``__getattr__`` hook, near a thousand
# instructions each (3.12 dropped the hook).
_OK = Outcome.OK
_PAGED = MemoryKind.PAGED
_RESPONSES = AnswerShape.RESPONSES
# The status logged and counted for a client that left before any answer (nginx's convention).
_CLIENT_CLOSED_STATUS = 499
# Refusals for what a body is, which still count as requests of the tenant that sent them.
_BODY_REFUSALS = frozenset(
    (Outcome.BAD_REQUEST.value, Outcome.TOO_LARGE.value, Outcome.REQUEST_TIMEOUT.value)
)
# Times each backend may refuse one request's connection before it gets a 502.
_CONNECT_ATTEMPTS = 3
# What an exchange reports until it sends a request upstream: only read, never filled (each
# attempt upstream fills a Relay of its own).
_NOT_SENT = Relay()
# A request on a path without cost rules (no prompt to read) costs one request and no memory.
_PLAIN_COST = Cost(
    requests=1, input_tokens=0, output_tokens=0, kv_bytes=0, kv_gib_seconds=0.0, price=0.0
)


def handle(request: web.Request) -> Coroutine[Any, Any, web.StreamResponse]:
    """The route for every proxied path: the exchange's own coroutine, not one awaiting it
    (each coroutine layer is paid again on every resume of the request)."""
    return Exchange(request, request.app[GATEWAY]).run()


class Exchange:
    """One request's way through the gateway, and what it did (for settlement, metrics and the
    access log). See the module docstring."""

    __slots__ = (
        "backend",
        "body",
        "cost",
        "deadline",
        "gw",
        "held",
        "live",
        "model",
        "outcome",
        "parsed",
        "queued_s",
        "relay",
        "request",
        "request_id",
        "route",
        "shadowed",
        "span",
        "started",
        "status",
        "tenant",
        "ttft_s",
        "uncosted",
    )

    def __init__(self, request: web.Request, gw: Gateway) -> None:
        self.request = request
        self.gw = gw
        self.live = gw.live  # the one read of the live state: see the module docstring
        self.started = gw.clock.now()
        # the queue deadline, waiting for buckets included: set once the tenant is known
        self.deadline = self.started
        self.tenant: Tenant | None = None
        self.model: Model | None = None
        self.body = b""
        self.parsed: ParsedRequest | None = None
        self.cost = _PLAIN_COST
        self.held: Charge | None = None
        self.outcome = _OK
        self.queued_s = 0.0
        self.backend: Backend | None = None  # the one that served it
        self.relay = _NOT_SENT
        self.route = routes.route(request.method, request.path)  # which API it speaks
        self.uncosted: str | None = None  # the unknown_endpoints rule that let it through
        self.request_id = request_id(request.headers)  # the client's, if sane, else a new one
        self.status = 0  # the HTTP status the client got; 0 until it got one
        self.shadowed = False  # a shadow tenant's request a bucket would have refused
        self.ttft_s: float | None = None
        tracer = gw.tracer
        self.span = None if tracer is None else tracer.start(request.path, request.headers)

    async def run(self) -> web.StreamResponse:
        try:
            refusal = self._allowed() or self._authenticate()
            if refusal is None:
                refusal = await self._read()
                if refusal is not None:
                    refusal = await self._count_refused(refusal)
            if refusal is None:
                # a store that decides at once is not awaited (a coroutine less per request)
                held = self._charge_now()
                refusal = self._charged(held if held is not None else await self._charge())
        except Exception as exc:
            refusal = failure(exc, self.gw)
        if refusal is not None:
            return self._refused(refusal)
        try:
            response = responses.shaped(await self._admit_and_forward(), self.route.errors)
            self.status = response.status
            if not response.prepared:
                response.headers["x-request-id"] = self.request_id
            return response
        except asyncio.CancelledError:
            self.outcome = Outcome.CLIENT_CLOSED
            raise
        except Exception as exc:
            return self._failed_after_charge(exc)
        finally:
            self._settle(self.gw.clock.now())

    # -- the steps, in order ------------------------------------------------------------------

    def _allowed(self) -> web.Response | None:
        """Only the API paths a client may call are proxied (``routes.allowed``)."""
        request = self.request
        if routes.allowed(request.method, request.path, self.live.policy.server.allow_paths):
            return None
        message = f"{request.method} {request.path} is not a path this gateway proxies."
        return responses.error(Outcome.NOT_FOUND, message, should_retry=False)

    def _authenticate(self) -> web.Response | None:
        policy = self.live.policy
        self.tenant = tenant = policy.tenant_for_key(api_key(self.request.headers))
        if tenant is None:
            return responses.error(Outcome.UNAUTHORIZED, responses.BAD_KEY)
        # the tenant's max_wait, else the policy's, or less when the client asks
        own = tenant.max_wait_s
        wait = asked_max_wait(self.request.headers, policy.max_wait_s if own is None else own)
        self.deadline = self.started + wait
        return None

    async def _read(self) -> web.Response | None:
        """The body, the model it names and its estimated cost."""
        request = self.request
        server = self.live.policy.server
        try:
            if request.content.is_eof():  # the whole body is here: reading it cannot wait
                self.body = await request.read()
            else:
                async with asyncio.timeout(server.connections.body_s):
                    self.body = await request.read()
        except TimeoutError:
            message = f"The request body did not arrive within {server.connections.body_s:g} s."
            return responses.error(Outcome.REQUEST_TIMEOUT, message, should_retry=False)
        except web.HTTPRequestEntityTooLarge:
            # aiohttp stops at the max_body the gateway started with; a smaller reloaded one is
            # checked below
            return _too_large(server.max_body_bytes)
        if len(self.body) > server.max_body_bytes:
            return _too_large(server.max_body_bytes)
        model_name: str | None = None
        if self.route.parse is not None:
            try:
                bounds.check_body(self.body, server.limits)
                self.parsed = self.route.parse(self.body, request.headers.get("Content-Type", ""))
                bounds.check_texts(self.parsed.texts, server.limits)
            except BadRequestBody as exc:
                return responses.error(
                    Outcome.BAD_REQUEST, exc.message, param=exc.param, should_retry=False
                )
            except bounds.LimitExceeded as exc:
                return responses.error(
                    Outcome.BAD_REQUEST, str(exc), code="limit_exceeded", should_retry=False
                )
            model_name = self.parsed.model
        elif self.body:
            model_name = routes.model_of(self.body)
        model_name = model_name or server.fallback_model
        self.model = self.live.policy.models.get(model_name) if model_name is not None else None
        if self.model is None:
            return self._not_found(model_name)
        allowed = self.tenant.models if self.tenant is not None else None
        if allowed is not None and self.model.name not in allowed:
            return self._forbidden(self.model.name, allowed)
        if self.parsed is None and self.route.unknown and self.body:
            refusal = self._unknown_endpoint(self.model)
            if refusal is not None:
                return refusal
        if self.parsed is None:
            return None
        if self.parsed.previous_response_id is not None:
            self._add_previous_response(self.parsed.previous_response_id)
        try:
            self.cost = estimate(
                self.parsed, self.model.profile, self.live.counters.get(self.model.name)
            )
        except ContextOverflowError as exc:
            return responses.error(
                Outcome.BAD_REQUEST,
                str(exc),
                code="context_length_exceeded",
                param="messages",
                should_retry=False,
            )
        return None

    async def _count_refused(self, refusal: web.Response) -> web.Response:
        """A request refused for its body (malformed, over a parse limit, too large, too slow)
        still counts against its tenant's request limits; past them it gets the 429 instead,
        so bad bodies cost a hostile tenant its own limit while they cost the gateway little."""
        outcome = refusal.headers.get("x-kvgate-outcome")
        if self.tenant is None or self.tenant.shadow or outcome not in _BODY_REFUSALS:
            return refusal
        specs = self.live.policy.request_buckets(self.tenant.name)
        if not specs:
            return refusal
        held = await charge(self.live.store, specs, _PLAIN_COST, orphaned=lambda _: None)
        if held.verdict.allowed or held.verdict.store_error:
            return refusal
        return rate_refusal(held, ratelimit_headers(held), self.live.policy.limit_words)

    def _charge_now(self) -> Charge | None:
        """The charge, where the store takes it without a round trip; else None."""
        tenant, model = self._who()
        buckets = self.live.policy.buckets(tenant.name, model.name)
        return charge_now(self.live.store, buckets, self.cost, self._wait_left())

    async def _charge(self) -> Charge:
        """The charge through the store's round trip (see ``limits.charge``)."""
        tenant, model = self._who()
        return await charge(
            self.live.store,
            self.live.policy.buckets(tenant.name, model.name),
            self.cost,
            orphaned=self._settle_charge_of,
            max_wait_s=self._wait_left(),
        )

    def _wait_left(self) -> float:
        """How long a bucket that waits may make the request wait: what its deadline leaves."""
        left = self.deadline - self.gw.clock.now()
        return left if left > 0.0 else 0.0  # not max(): see ``limits.ratelimit_headers``

    def _charged(self, held: Charge) -> web.Response | None:
        """The refusal the charge's verdict makes, if any (a shadow tenant's is only noted)."""
        tenant, _ = self._who()
        self.held = held
        verdict = held.verdict
        if verdict.allowed:
            return None
        headers = ratelimit_headers(held)
        if verdict.store_error:
            message = "The shared limit store is unreachable and this gateway fails closed."
            return responses.error(Outcome.STORE_ERROR, message, retry_after_s=1.0, headers=headers)
        if not tenant.shadow:
            return rate_refusal(held, headers, self.live.policy.limit_words)
        self.shadowed = True
        return None

    async def _admit_and_forward(self) -> web.StreamResponse:
        """Wait for room on a backend, then forward. A backend with nothing listening (so
        nothing was sent) is left out and the request admitted again; once every backend has
        refused it, it waits for them to come back, within its deadline, a few times."""
        tenant, model = self._who()
        headers = ratelimit_headers(self.held) if self.held is not None else {}
        headers["x-request-id"] = self.request_id
        waited = self.held.verdict.wait_s if self.held is not None else 0.0
        if waited > 0:
            # a bucket that waits took this request in its turn: go on when that turn comes
            # (it began before the deadline; admission gets what is left, or at least now)
            await asyncio.sleep(waited)
            self.queued_s = waited
            self.deadline = max(self.deadline, self.gw.clock.now())
        parsed = self.parsed
        prefix: tuple[int, ...] = ()
        if parsed is not None and self.gw.admitter.caches_prefixes(model.name):
            prefix = prompt_chain(parsed.texts)
        ticket = Ticket(
            tenant=tenant.name,
            model=model.name,
            priority=asked_priority(self.request.headers, tenant.priority),
            weight=tenant.weight,
            prompt_tokens=self.cost.input_tokens,
            max_output_tokens=self.cost.output_tokens,
            kv_bytes_per_token=model.profile.kv_bytes_per_token,
            deadline=self.deadline,
            prefix=prefix,
            chunk_tokens=CHUNK_BYTES / model.profile.chars_per_token,
        )
        strip_usage = (
            self.route.asks_usage
            and parsed is not None
            and parsed.stream
            and not parsed.include_usage
        )
        body = with_usage_requested(self.body) if strip_usage else self.body
        refusals = 0
        while True:
            try:
                lease = await self.gw.admitter.acquire(ticket)
            except Shed as shed:
                self.outcome = shed.outcome
                return responses.error(
                    shed.outcome,
                    shed.message,
                    retry_after_s=shed.retry_after_s,
                    should_retry=shed.should_retry,
                    headers=headers,
                )
            self.queued_s = waited + lease.queued_s
            self.gw.metrics.timed(self.gw.metrics.queue_wait, model.name, lease.queued_s)
            # forwarded from here, not from a coroutine of its own: each layer is paid again on
            # every resume of the request
            relay = self.relay = Relay()
            sent = self.gw.clock.now()
            connected = True
            try:  # from the lease on, whatever happens ends in its release (``finally``)
                backend, sent_body, answer = self._upstream(lease, body, strip_usage)
                response = await forward(
                    self.request,
                    self.gw.upstreams.pool(backend.url),
                    backend.url,
                    body=sent_body,
                    headers=self._upstream_headers(backend),
                    timeouts=self.live.policy.server.timeouts,
                    answer=answer,
                    relay=relay,
                    clock=self.gw.clock,
                    extra_headers=headers,
                    on_start=lease.started,
                    on_first_token=lease.first_token,
                )
                self._ended_upstream(relay)
                return response
            except UpstreamConnectError as exc:
                connected = False
                refusals += 1
                if refusals >= _CONNECT_ATTEMPTS * len(model.backends):
                    self.outcome = Outcome.UPSTREAM_ERROR
                    return responses.error(self.outcome, _summary(exc, model), headers=headers)
                exclude = ticket.exclude | {lease.backend_url}
                if len(exclude) >= len(model.backends):
                    exclude = frozenset()  # all down: wait for one to come back (admission)
                ticket = msgspec.structs.replace(ticket, exclude=exclude)
            except UpstreamTimeout as exc:
                self.outcome = Outcome.UPSTREAM_TIMEOUT
                return responses.error(self.outcome, str(exc), headers=headers)
            except UpstreamError as exc:
                self.outcome = Outcome.UPSTREAM_ERROR
                return responses.error(self.outcome, _summary(exc, model), headers=headers)
            finally:
                self._released(lease, relay, sent, connected)

    def _upstream(
        self, lease: Lease, body: bytes, strip_usage: bool
    ) -> tuple[Backend, bytes, Answer]:
        """The backend ``lease`` placed the request on, the body it is sent, and how its
        answer is read (an alias is renamed both ways)."""
        _, model = self._who()
        backend = self.backend = next(b for b in model.backends if b.url == lease.backend_url)
        served = backend.served_name
        rename = None
        if served is not None and served != model.name:  # an alias: the backend's name upstream
            body = routes.with_model(body, served)
            rename = routes.renamer(served, model.name)
        return backend, body, Answer(self.route.answers, strip_usage, rename)

    def _released(self, lease: Lease, relay: Relay, sent: float, connected: bool) -> None:
        """The lease given back once the exchange upstream is over, with what it told."""
        _, model = self._who()
        ttft = relay.first_token_at - sent if relay.first_token_at is not None else None
        self.ttft_s = ttft
        if ttft is not None:
            self.gw.metrics.timed(self.gw.metrics.ttft, model.name, ttft)
        lease.release(
            output_tokens=relay.output_tokens if relay.complete else None,
            ttft_s=ttft,
            failure=relay.failure if connected else "connect",
        )

    def _ended_upstream(self, relay: Relay) -> None:
        """The outcome of an answer relayed in part: its client left, or its backend broke."""
        if relay.client_gone and not relay.complete:
            self.outcome = Outcome.CLIENT_CLOSED
        elif not relay.complete and self.outcome is _OK:
            timed_out = relay.failure == "timeout"
            self.outcome = Outcome.UPSTREAM_TIMEOUT if timed_out else Outcome.UPSTREAM_ERROR

    def _settle(self, ended: float) -> None:
        """Metrics, the access log, and the buckets settled against the real usage."""
        tenant, model = self._who()
        relay = self.relay
        if self.outcome is _OK and relay.status >= 500:
            self.outcome = Outcome.UPSTREAM_ERROR
        elif self.outcome is _OK and relay.status >= 400:
            self.outcome = Outcome.UPSTREAM_CLIENT_ERROR  # the backend refused it: not served
        if not self.status:
            self.status = relay.status or _CLIENT_CLOSED_STATUS
        actual: Cost | None = None
        metrics = self.gw.metrics
        if relay.status:
            cost = self.cost
            input_tokens = relay.prompt_tokens
            output_tokens = relay.output_tokens
            if output_tokens is None:
                output_tokens = cost.output_tokens if relay.complete else 0
            sequences = self._sequences()
            input_tokens, output_tokens = sane_usage(
                model.profile,
                sequences,
                cost.input_tokens if input_tokens is None else input_tokens,
                output_tokens,
            )
            actual = actual_cost(
                model.profile,
                input_tokens,
                output_tokens,
                ended - self.started - self.queued_s,
                sequences=sequences,
                holding=self._holding(ended, sequences),
            )
            metrics.settled(
                tenant.name,
                model.name,
                actual.input_tokens,
                actual.output_tokens,
                actual.kv_gib_seconds,
            )
            metrics.timed(metrics.duration, model.name, ended - self.started)
            if self.route.answers is _RESPONSES and relay.answer_id is not None:
                tokens = actual.input_tokens + actual.output_tokens
                self.gw.responses.remember(tenant.name, relay.answer_id, tokens)
        if self.uncosted is not None:
            metrics.uncosted.labels(tenant.name, model.name, self.uncosted).inc()
        # ``_value_``: the member's own attribute (``.value`` is a Python-level property call)
        metrics.count(tenant.name, model.name, self.outcome._value_, self.status)
        if self.shadowed:
            metrics.count(tenant.name, model.name, Outcome.SHADOW_LIMITED.value, self.status)
        if self.gw.access is not None:
            self.gw.access.write(self._access_record(ended, actual))
        if self.span is not None:
            self._end_span(actual)
        if self.held is not None:
            self._settle_charge_of(self.held, actual)

    # -- helpers ------------------------------------------------------------------------------

    def _settle_charge_of(self, held: Charge, actual: Cost | None = None) -> None:
        """Settle the buckets against ``actual`` usage; None (the request went no further, its
        client left) refunds all but the request itself. A networked store settles meanwhile."""
        pending = settle(self.live.store, held, actual)
        if pending is not None:
            self.gw.spawn(pending)

    def _who(self) -> tuple[Tenant, Model]:
        """Tenant and model, known once ``_read`` passed."""
        if self.tenant is None or self.model is None:
            raise RuntimeError("a step ran before the request was authenticated and read")
        return self.tenant, self.model

    def _sequences(self) -> int:
        """Output sequences (n x prompts) the output tokens are spread over."""
        parsed = self.parsed
        return 1 if parsed is None else parsed.n * parsed.prompts

    def _holding(self, ended: float, sequences: int) -> Holding | None:
        """How the backend that served the request held its KV, for GiB·s."""
        backend = self.backend
        if backend is None:
            return None
        relay = self.relay
        decode_s = None
        if relay.streamed and relay.first_token_at is not None:
            decode_s = ended - relay.first_token_at
        return Holding(
            growing=backend.config.memory_kind is _PAGED,
            reserved_output_tokens=self.cost.output_tokens // (sequences if sequences > 1 else 1),
            decode_s=decode_s,
        )

    def _unknown_endpoint(self, model: Model) -> web.Response | None:
        """A body naming a model on a path without cost rules: the policy's
        ``server.unknown_endpoints`` refuses it, estimates it, or lets it through free."""
        rule = self.live.policy.server.unknown_endpoints
        if rule == "deny":
            request = self.request
            message = (
                f"{request.method} {request.path} is not an endpoint this gateway can cost, "
                "and its policy refuses those (server.unknown_endpoints: deny)."
            )
            return responses.error(Outcome.NOT_FOUND, message, should_retry=False)
        self.uncosted = rule
        if rule == "estimate":
            self.parsed = routes.estimated(self.body, model.name)
        return None

    def _add_previous_response(self, response_id: str) -> None:
        """The earlier turns the server prepends to a continued response, as the gateway saw
        them settle: exact token counts, added to the prompt."""
        tenant, _ = self._who()
        parsed = self.parsed
        prior = self.gw.responses.tokens_of(tenant.name, response_id)
        if parsed is not None and prior:
            self.parsed = msgspec.structs.replace(parsed, token_ids=parsed.token_ids + prior)

    def _failed_after_charge(self, exc: Exception) -> web.StreamResponse:
        """An exception once admitted: the error answer, or, when the answer has started, the
        connection cut (its client sees a truncated answer, never a second head)."""
        response = failure(exc, self.gw)
        self.outcome = Outcome(response.headers["x-kvgate-outcome"])
        if self.relay.status:
            if self.request.transport is not None:
                self.request.transport.abort()
            return web.Response(status=self.relay.status)
        return responses.shaped(response, self.route.errors)

    def _refused(self, response: web.Response) -> web.StreamResponse:
        """Count and log a request refused before admission, in its API's error shape."""
        response = responses.shaped(response, self.route.errors)  # type: ignore[assignment]
        response.headers["x-request-id"] = self.request_id
        outcome = response.headers["x-kvgate-outcome"]
        self.outcome, self.status = Outcome(outcome), response.status
        tenant = self.tenant.name if self.tenant else "unknown"
        model = self.model.name if self.model else "unknown"
        self.gw.metrics.count(tenant, model, outcome, response.status)
        if self.gw.access is not None:
            record = AccessRecord(
                tenant, model, response.status, outcome, request_id=self.request_id
            )
            self.gw.access.write(record)
        if self.span is not None:
            self._end_span(None)
        return response

    def _access_record(self, ended: float, actual: Cost | None) -> AccessRecord:
        tenant, model = self._who()
        return AccessRecord(
            tenant.name,
            model.name,
            self.status,
            self.outcome._value_,
            backend=self.backend.url if self.backend else None,
            duration_s=round(ended - self.started, 6),
            queued_s=round(self.queued_s, 6) if self.queued_s else 0.0,  # round() costs ~2.7k
            input_tokens=actual.input_tokens if actual is not None else None,
            output_tokens=actual.output_tokens if actual is not None else None,
            error=self.relay.error,
            uncosted=self.uncosted,
            request_id=self.request_id,
        )

    def _not_found(self, model_name: str | None) -> web.Response:
        if model_name is None:
            request = self.request
            message = (
                f"No route for {request.method} {request.path}: send a JSON body with a `model`."
            )
            return responses.error(Outcome.NOT_FOUND, message, should_retry=False)
        known = ", ".join(sorted(self.live.policy.models))
        message = f"The model `{model_name}` does not exist here. Available: {known}."
        return responses.error(
            Outcome.NOT_FOUND, message, code="model_not_found", param="model", should_retry=False
        )

    def _upstream_headers(self, backend: Backend) -> CIMultiDict[str]:
        request = self.request
        headers = upstream_headers(
            request.headers,
            peer=request.remote,
            scheme=request.scheme,
            backend_auth=backend.authorization,
            request_id=self.request_id,
        )
        if self.span is not None and self.gw.tracer is not None:
            self.gw.tracer.inject(self.span, headers)
        return headers

    def _end_span(self, actual: Cost | None) -> None:
        tracer = self.gw.tracer
        if tracer is None:
            return
        tracer.end(
            self.span,
            model=self.model.name if self.model else None,
            tenant=self.tenant.name if self.tenant else None,
            status=self.status,
            outcome=self.outcome.value,
            input_tokens=actual.input_tokens if actual is not None else None,
            output_tokens=actual.output_tokens if actual is not None else None,
            ttft_s=self.ttft_s,
        )

    def _forbidden(self, model_name: str, allowed: frozenset[str]) -> web.Response:
        tenant = self.tenant.name if self.tenant is not None else "unknown"
        message = (
            f"Tenant {tenant} may not use the model `{model_name}`. "
            f"Its models: {', '.join(sorted(allowed))}."
        )
        return responses.error(
            Outcome.FORBIDDEN, message, code="model_not_allowed", param="model", should_retry=False
        )


def _too_large(limit: int) -> web.Response:
    message = f"Request body is larger than this gateway's limit of {limit} bytes."
    return responses.error(Outcome.TOO_LARGE, message, should_retry=False)


def _summary(exc: UpstreamError, model: Model) -> str:
    """A backend failure as its client may see it: the kind, never the backend's address or
    its own words (the access log keeps those)."""
    cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "error"
    if isinstance(exc, UpstreamConnectError):
        return f"No backend of `{model.name}` accepted the connection ({cause})."
    return f"The backend of `{model.name}` answered badly ({cause})."
