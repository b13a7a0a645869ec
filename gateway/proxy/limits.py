"""The token-bucket step of the request path: charge a request's estimated cost to every bucket
that applies (all or nothing), describe the result in OpenAI's ``x-ratelimit-*`` headers, and
settle the charge against the real usage afterwards."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.cost import Cost
from gateway.core.types import Unit
from gateway.proxy.responses import reset_text
from gateway.store.base import LimitStore

_HEADER_UNITS = (Unit.REQUESTS, Unit.TOKENS)


@dataclass(frozen=True, slots=True)
class Charge:
    specs: tuple[BucketSpec, ...]
    amounts: tuple[float, ...]
    verdict: Verdict

    @property
    def charged(self) -> bool:
        return self.verdict.allowed and not self.verdict.store_error and bool(self.specs)


async def charge(store: LimitStore, specs: tuple[BucketSpec, ...], cost: Cost) -> Charge:
    amounts = tuple(cost.amount(spec.unit) for spec in specs)
    if not specs:
        return Charge(specs, amounts, Verdict(True, 0.0, False, None, (), ()))
    return Charge(specs, amounts, await store.acquire(specs, amounts))


async def settle(store: LimitStore, held: Charge, actual: Cost | None) -> None:
    """Refund what the estimate over-reserved, charge what it under-reserved; with no ``actual``
    (the request never reached a backend) refund everything but the request itself."""
    if not held.charged:
        return
    deltas = _deltas(held.specs, held.amounts, actual)
    if any(deltas):
        await store.adjust(held.specs, deltas)


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
    headers: dict[str, str] = {}
    verdict = held.verdict
    if not verdict.remaining:
        return headers
    for unit in _HEADER_UNITS:
        tightest = None
        for i, spec in enumerate(held.specs):
            if spec.unit is unit and (
                tightest is None or verdict.remaining[i] < verdict.remaining[tightest]
            ):
                tightest = i
        if tightest is None:
            continue
        name = unit.value
        headers[f"x-ratelimit-limit-{name}"] = f"{held.specs[tightest].burst:.0f}"
        headers[f"x-ratelimit-remaining-{name}"] = f"{max(verdict.remaining[tightest], 0):.0f}"
        headers[f"x-ratelimit-reset-{name}"] = reset_text(verdict.reset_s[tightest])
    return headers
