"""The token-bucket step of the request path: charge a request's estimated cost to every bucket
that applies (all or nothing), describe the result in OpenAI's ``x-ratelimit-*`` headers, and
settle the charge against the real usage afterwards (``gateway.core.cost.settlement``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from aiohttp import web

from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.cost import Cost, settlement
from gateway.core.types import Outcome, Unit
from gateway.proxy import responses
from gateway.proxy.responses import reset_text
from gateway.store.base import LimitStore

_HEADER_UNITS = (Unit.REQUESTS, Unit.TOKENS)


class Charge(msgspec.Struct, frozen=True, gc=False):
    """What a request was charged: per bucket its spec and amount, and the store's verdict."""

    specs: tuple[BucketSpec, ...]
    amounts: tuple[float, ...]
    verdict: Verdict

    @property
    def charged(self) -> bool:
        """The buckets hold this request's amounts (so settlement has something to settle)."""
        return self.verdict.allowed and not self.verdict.store_error and bool(self.specs)

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(spec.unit for spec in self.specs)


async def charge(
    store: LimitStore,
    specs: tuple[BucketSpec, ...],
    cost: Cost,
    *,
    orphaned: Callable[[Charge], None],
    max_wait_s: float = 0.0,
) -> Charge:
    """Take ``cost`` from every bucket of ``specs``; buckets that wait may pass it with a wait
    of up to ``max_wait_s`` (``Charge.verdict.wait_s``). When the client leaves during a
    networked store's round trip, the take may still land: ``orphaned`` gets that charge then,
    to undo."""
    amounts = tuple(cost.amount(spec.unit) for spec in specs)
    if not specs:
        return Charge(specs, amounts, Verdict(allowed=True))
    verdict = store.acquire_now(specs, amounts, max_wait_s)
    if verdict is not None:
        return Charge(specs, amounts, verdict)
    take = asyncio.ensure_future(store.acquire(specs, amounts, max_wait_s))
    try:
        verdict = await asyncio.shield(take)
    except asyncio.CancelledError:

        def landed(done: asyncio.Future[Verdict]) -> None:
            if not done.cancelled() and done.exception() is None:
                orphaned(Charge(specs, amounts, done.result()))

        take.add_done_callback(landed)
        raise
    return Charge(specs, amounts, verdict)


def settle(
    store: LimitStore, held: Charge, actual: Cost | None
) -> Coroutine[Any, Any, None] | None:
    """Refund what the estimate over-reserved, charge what it under-reserved; with no ``actual``
    (the request never reached a backend) refund everything but the request itself.

    A store that can settle at once does; for a networked one the round trip is returned, for
    the caller to run in the background (the client need not wait for it)."""
    if not held.charged:
        return None
    deltas = settlement(held.units, held.amounts, actual)
    if not any(deltas) or store.adjust_now(held.specs, deltas):
        return None
    return store.adjust(held.specs, deltas)


def ratelimit_headers(held: Charge) -> dict[str, str]:
    """OpenAI's headers for requests and tokens: the tightest bucket of each unit."""
    remaining = held.verdict.remaining
    if not remaining:  # a verdict the store's fallback made up knows no levels
        return {}
    tightest: dict[Unit, int] = {}
    for i, spec in enumerate(held.specs):
        if spec.unit in _HEADER_UNITS:
            j = tightest.get(spec.unit)
            if j is None or remaining[i] < remaining[j]:
                tightest[spec.unit] = i
    headers: dict[str, str] = {}
    for unit, i in tightest.items():
        name = unit.value
        headers[f"x-ratelimit-limit-{name}"] = f"{held.specs[i].burst:.0f}"
        headers[f"x-ratelimit-remaining-{name}"] = f"{max(remaining[i], 0):.0f}"
        headers[f"x-ratelimit-reset-{name}"] = reset_text(held.verdict.reset_s[i])
    return headers


def rate_refusal(held: Charge, headers: dict[str, str]) -> web.Response:
    """The 429 for a charge a bucket refused, naming that bucket and when to retry (never, with
    ``x-should-retry: false``, for a request larger than the bucket's burst)."""
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
