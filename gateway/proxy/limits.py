"""The token-bucket step of the request path: charge a request's estimated cost to every bucket
that applies (all or nothing), describe the result in OpenAI's ``x-ratelimit-*`` headers, and
settle the charge against the real usage afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import msgspec

from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.cost import Cost
from gateway.core.types import Unit
from gateway.proxy.responses import reset_text
from gateway.store.base import LimitStore
from gateway.store.memory import MemoryLimitStore

_HEADER_UNITS = (Unit.REQUESTS, Unit.TOKENS)


class Charge(msgspec.Struct, frozen=True, gc=False):
    specs: tuple[BucketSpec, ...]
    amounts: tuple[float, ...]
    verdict: Verdict

    @property
    def charged(self) -> bool:
        return self.verdict.allowed and not self.verdict.store_error and bool(self.specs)


async def charge(
    store: LimitStore,
    specs: tuple[BucketSpec, ...],
    cost: Cost,
    *,
    orphaned: Callable[[Charge], None],
) -> Charge:
    """Take ``cost`` from every bucket of ``specs``. When the client leaves during a networked
    store's round trip, the take may still land: ``orphaned`` gets that charge then, to undo."""
    amounts = tuple(cost.amount(spec.unit) for spec in specs)
    if not specs:
        return Charge(specs, amounts, Verdict(True, 0.0, False, None, (), ()))
    # The in-process store is called directly: a coroutine per request is measurable overhead,
    # and a call that never suspends cannot be cut short.
    if isinstance(store, MemoryLimitStore):
        return Charge(specs, amounts, store.take(specs, amounts))
    take = asyncio.ensure_future(store.acquire(specs, amounts))
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

    The in-process store is settled at once; for a networked one the round trip is returned,
    for the caller to run in the background (the client need not wait for it)."""
    if not held.charged:
        return None
    deltas = _deltas(held.specs, held.amounts, actual)
    if not any(deltas):
        return None
    if isinstance(store, MemoryLimitStore):
        store.settle(held.specs, deltas)
        return None
    return store.adjust(held.specs, deltas)


def _deltas(
    specs: Sequence[BucketSpec], amounts: Sequence[float], actual: Cost | None
) -> tuple[float, ...]:
    out = []
    for spec, reserved in zip(specs, amounts, strict=True):
        if spec.unit is Unit.REQUESTS:
            out.append(0.0)
        elif actual is None:
            out.append(-reserved)
        else:
            out.append(actual.amount(spec.unit) - reserved)
    return tuple(out)


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
