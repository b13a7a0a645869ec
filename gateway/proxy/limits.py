"""The token-bucket step of the request path: charge a request's estimated cost to every bucket
that applies (all or nothing), describe the result in OpenAI's ``x-ratelimit-*`` headers, and
settle the charge against the real usage afterwards (``gateway.core.cost.settlement``)."""

from __future__ import annotations

import asyncio
import functools
import operator
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
_UNIT_OF = operator.attrgetter("unit")
_ALLOWED = Verdict(allowed=True)  # no bucket applies (a frozen value, shared)


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
        return tuple(map(_UNIT_OF, self.specs))  # map in C: no generator per settlement


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
    held = charge_now(store, specs, cost, max_wait_s)
    if held is not None:
        return held
    amounts = tuple(cost.amount(spec.unit) for spec in specs)
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


def charge_now(
    store: LimitStore, specs: tuple[BucketSpec, ...], cost: Cost, max_wait_s: float = 0.0
) -> Charge | None:
    """``charge`` without awaiting, where the store decides at once (memory, or no buckets);
    None: only the store's round trip can tell (``charge``)."""
    amounts = tuple(cost.amount(spec.unit) for spec in specs)
    if not specs:
        return Charge(specs, amounts, _ALLOWED)
    verdict = store.acquire_now(specs, amounts, max_wait_s)
    return None if verdict is None else Charge(specs, amounts, verdict)


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


# The three header names of each unit with headers, made once (not formatted per request).
_HEADER_NAMES = tuple(
    tuple(f"x-ratelimit-{part}-{unit._value_}" for part in ("limit", "remaining", "reset"))
    for unit in _HEADER_UNITS
)


def ratelimit_headers(held: Charge) -> dict[str, str]:
    """OpenAI's headers for requests and tokens: the tightest bucket of each unit."""
    remaining = held.verdict.remaining
    if not remaining:  # a verdict the store's fallback made up knows no levels
        return {}
    tightest = [-1] * len(_HEADER_UNITS)  # by unit of _HEADER_UNITS, the bucket's index
    for i, spec in enumerate(held.specs):
        if spec.unit in _HEADER_UNITS:
            u = _HEADER_UNITS.index(spec.unit)
            j = tightest[u]
            if j < 0 or remaining[i] < remaining[j]:
                tightest[u] = i
    # Indexing and conditionals rather than zip(strict=True) and max(): on Python 3.11 those
    # builtins parse their arguments the slow way, hundreds of instructions a call.
    headers: dict[str, str] = {}
    for u, i in enumerate(tightest):
        if i >= 0:
            limit, left, reset = _HEADER_NAMES[u]
            level = remaining[i]
            headers[limit] = _whole(held.specs[i].burst)
            headers[left] = f"{level if level > 0 else 0:.0f}"
            headers[reset] = reset_text(held.verdict.reset_s[i])
    return headers


@functools.lru_cache(maxsize=256)
def _whole(burst: float) -> str:
    # a bucket's burst, the same for each of its requests: formatted once
    return f"{burst:.0f}"


def rate_refusal(
    held: Charge, headers: dict[str, str], words: Callable[[str], str]
) -> web.Response:
    """The 429 for a charge a bucket refused, naming that bucket in the policy's ``words`` (a
    bucket key is internal) and when to retry (never, with ``x-should-retry: false``, for a
    request larger than the bucket's burst)."""
    verdict = held.verdict
    index = verdict.blocking if verdict.blocking is not None else 0
    spec = held.specs[index]
    unit = spec.unit.value
    limit = words(spec.key)
    if verdict.never:
        message = (
            f"This request needs {held.amounts[index]:.6g} {unit} but {limit} holds at most "
            f"{spec.burst:.6g}: it can never pass. Make the request smaller."
        )
        return responses.error(
            Outcome.RATE_LIMITED, message, type_=unit, should_retry=False, headers=headers
        )
    message = f"Rate limit reached: {limit}. Retry in {verdict.retry_after_s:.3f}s."
    return responses.error(
        Outcome.RATE_LIMITED,
        message,
        type_=unit,
        retry_after_s=verdict.retry_after_s,
        headers=headers,
    )
