"""Token buckets as GCRA: one theoretical arrival time (TAT) per bucket, weighted costs.

A bucket with ``rate_per_s`` r and ``burst`` B stores a single float, its TAT (seconds, on the
caller's clock). The bucket is full when ``tat <= now`` (a full bucket needs no state, so a missing
TAT is ``None``); it holds ``B - (tat - now) * r`` otherwise. Taking ``a`` moves the TAT forward by
``a / r`` and is allowed while the new TAT is at most ``tau = B / r`` ahead of ``now``.

This module is the reference twin of ``gateway/store/lua/acquire.lua`` and ``adjust.lua``: the
formulas and their order are kept identical (a differential test compares them), so change both.
Comparisons allow ``EPSILON_S`` of float slack, so a retry exactly ``retry_after_s`` later passes.

A bucket whose spec ``waits`` may also pass a take that would otherwise have to wait, when its
turn begins within the caller's ``max_wait_s`` (it may end later by at most the take's own
refill time): the take is recorded at once (its TAT moves by the whole amount, past the
tolerance: a debt of at most ``max_wait_s`` of refill plus the take itself) and the verdict
says how long to wait before going on (``wait_s``). Each later take then sees that TAT, so
waiting requests are served in arrival order whatever their size: a large request reserves its
place and is not starved by small ones that would each fit sooner.

A refund moves the TAT back while earlier takes still wait for the turns they were told, so
the TAT alone would let a later small take go before them. A waiting bucket therefore keeps a
second time, its *turn*: when the last take that waits on it goes on (``turn_of``). A later
take's turn begins no earlier, and it goes on no earlier (FIFO per bucket; the refunded units
are not lost, they shorten the waits of the takes after). Neither time depends on the size of
the take, so every size has the same chance of a turn, and a take still goes on within its
budget plus its own refill time. A take whose turn would begin after its budget is refused at
once.

Refused takes are told apart, so that their retries do not collide: a waiting bucket keeps a
third time, its *line*: when the next refused take's place in the line of retries begins. A
refused take is told to come back when the queue has room for it (when its turn would begin
within its budget) or, if later, when its place begins; its place then lasts its own refill
time, so the take refused after it is told that much later (``places_of``). Each is told when
its own turn would come if the takes refused before it came back at theirs, instead of every
one being told the same moment, when only one of them could be granted (a thundering herd).
Like the turn, the place does not depend on the take's own size. The line only spaces the
retries: a take is granted by the queue alone, whoever it is (a store cannot tell a retry from
a new request), so a place is a forecast, not a reservation, and costs nothing if its client
never comes back. Places are given up to ``LINE_HORIZON_S`` ahead; a take refused beyond that
is told when the line ends and takes no place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from gateway.core.types import Unit

EPSILON_S = 1e-6
"""Slack in seconds when comparing a new TAT with the tolerance: above the float rounding of
clock readings up to 1e9 s (0.12 µs there), below any wait worth reporting (Lua uses the same)."""

LINE_HORIZON_S = 60.0
"""How far ahead a refused take is given a place in the line of retries. Clients honour a
``Retry-After`` up to about a minute (openai-python ignores a longer one and backs off on its
own), so places further out would mostly go unclaimed, and would only tell the takes after
them to wait longer still (Lua uses the same)."""


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """One rate limit: ``rate_per_s`` units refill per second, up to ``burst`` units held.

    ``key`` names the bucket's state in a store; it must be unique per bucket (include the unit
    and the scope, e.g. ``tenant:acme:tokens``) because two specs with one key share one TAT.
    """

    key: str
    unit: Unit
    rate_per_s: float
    burst: float
    waits: bool = False  # a take may wait for this bucket (up to the caller's max_wait_s)

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"bucket {self.key!r}: rate_per_s must be > 0, got {self.rate_per_s}")
        if not (self.burst > 0 and math.isfinite(self.burst)):
            raise ValueError(f"bucket {self.key!r}: burst must be > 0, got {self.burst}")


class Verdict(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """The answer to an all-or-nothing take across several buckets.

    ``retry_after_s`` is the exact wait until the same take would pass (for buckets that
    ``waits``: be granted its turn, with the same ``max_wait_s``, and no earlier than its place
    in the line of retries) if nothing else touched the buckets (0 when allowed, ``inf`` when
    ``never``); ``wait_s`` (allowed only) is how long the caller waits before going on, for
    buckets that ``waits`` (the take is already recorded). ``remaining`` and ``reset_s`` are
    per spec, in the order given, after this decision: units left (below 0 after a settled
    overrun, or a take that waits) and seconds until the bucket is full again. ``store_error``
    marks a verdict made up by a fallback policy because the limit store failed (allow:
    allowed; deny: refused, mapped to 503).
    """

    allowed: bool
    retry_after_s: float = 0.0
    never: bool = False
    blocking: int | None = None
    remaining: tuple[float, ...] = ()
    reset_s: tuple[float, ...] = ()
    store_error: bool = False
    wait_s: float = 0.0


def _start(tat: float | None, now: float) -> float:
    return now if tat is None or tat < now else tat


def level(tat: float | None, spec: BucketSpec, now: float) -> tuple[float, float]:
    """``(remaining units, seconds until full)`` of a bucket whose TAT is ``tat`` at ``now``."""
    start = _start(tat, now)
    return spec.burst - (start - now) * spec.rate_per_s, start - now


def try_take(
    tats: Sequence[float | None],
    specs: Sequence[BucketSpec],
    amounts: Sequence[float],
    now: float,
    max_wait_s: float = 0.0,
    turns: Sequence[float | None] | None = None,
    lines: Sequence[float | None] | None = None,
) -> tuple[Verdict, tuple[float, ...] | None]:
    """Take ``amounts[i]`` from every bucket ``specs[i]`` (current TAT ``tats[i]``), or nothing.

    Returns the verdict and, when allowed, the new TAT of every bucket (``None`` when refused:
    no bucket changes). An amount of 0 always passes and changes nothing. An amount above a
    bucket's burst can never pass: ``never`` is set and ``blocking`` names that bucket. Otherwise
    ``blocking`` is the bucket with the longest wait, which is the wait of the whole take. A
    bucket that ``waits`` passes a take whose turn begins at most ``max_wait_s`` from now (a
    turn begins no earlier than ``turns[i]``, the bucket's last turn given) and it goes on when
    its amount has refilled, never before that turn. The longest such wait is the verdict's
    ``wait_s``, and the caller records ``turn_of`` as the new turn of those buckets. A refused
    take comes back no earlier than the ``lines[i]`` of the buckets that wait (the place the
    line gives it); the caller records ``places_of`` as their new lines.
    """
    count = len(specs)
    if len(tats) != count or len(amounts) != count:
        raise ValueError("tats, specs and amounts must have the same length")
    if turns is not None and len(turns) != count:
        raise ValueError("turns and specs must have the same length")
    if lines is not None and len(lines) != count:
        raise ValueError("lines and specs must have the same length")
    starts: list[float] = []
    news: list[float] = []
    allowed = True
    never = False
    blocking: int | None = None
    worst = 0.0
    waited = 0.0
    for i in range(count):
        spec = specs[i]
        amount = amounts[i]
        if not amount >= 0:  # also refuses NaN, which would poison the stored TAT
            raise ValueError(f"bucket {spec.key!r}: amount must be >= 0, got {amount}")
        start = _start(tats[i], now)
        new = start + amount / spec.rate_per_s
        starts.append(start)
        news.append(new)
        if amount > 0:
            if amount > spec.burst:
                allowed = False
                if not never:
                    never = True
                    blocking = i
            else:
                wait = (new - now) - spec.burst / spec.rate_per_s
                late = wait
                if spec.waits:
                    # a turn is granted when it *begins* within the budget, whatever the size
                    # of the take: judged by its end, small takes would keep the queue just
                    # short enough for themselves and large ones would never get a turn. It
                    # begins when the TAT says, or when the last turn given here comes if that
                    # is later (FIFO): neither depends on the take's own size.
                    begins = wait - amount / spec.rate_per_s
                    turn = None if turns is None else turns[i]
                    if turn is not None and turn - now > begins:
                        begins = turn - now
                        if begins > wait:
                            wait = begins  # an earlier take still waits for its turn here
                    late = begins - max_wait_s
                    if late <= EPSILON_S:
                        if wait > waited:
                            waited = wait
                        continue
                if wait > EPSILON_S:
                    allowed = False
                    if not never and late > worst:
                        worst = late
                        blocking = i
    if not allowed and not never and lines is not None:
        # its place in the line of retries, after the places of the takes refused before it
        for i in range(count):
            line = lines[i]
            if specs[i].waits and amounts[i] > 0 and line is not None and line - now > worst:
                worst = line - now
                blocking = i
    ends = news if allowed else starts
    remaining = tuple(specs[i].burst - (ends[i] - now) * specs[i].rate_per_s for i in range(count))
    reset_s = tuple(end - now for end in ends)
    if allowed:
        verdict = Verdict(allowed=True, remaining=remaining, reset_s=reset_s, wait_s=waited)
        return verdict, tuple(news)
    verdict = Verdict(
        allowed=False,
        retry_after_s=math.inf if never else worst,
        never=never,
        blocking=blocking,
        remaining=remaining,
        reset_s=reset_s,
    )
    return verdict, None


def turn_of(verdict: Verdict, now: float) -> float | None:
    """The turn an allowed take that waits books on every bucket that ``waits`` and that it
    took a positive amount from (``None``: it waits for none, nothing to book). It is the
    take's own going-on time, so a later take on any of those buckets goes no earlier."""
    if not verdict.allowed or verdict.wait_s <= 0:
        return None
    return now + verdict.wait_s


def places_of(
    verdict: Verdict, specs: Sequence[BucketSpec], amounts: Sequence[float], now: float
) -> tuple[float | None, ...] | None:
    """The new line of every bucket that ``waits`` after a refused take (``None`` for the
    others; ``None`` alone when nothing is booked: the take passed, can never pass, or was
    told to come back beyond ``LINE_HORIZON_S``). The take's place begins when it was told to
    come back and lasts its amount's refill time, so the next refused take is told after it."""
    if verdict.allowed or verdict.never or verdict.retry_after_s > LINE_HORIZON_S:
        return None
    back = now + verdict.retry_after_s
    return tuple(
        back + amount / spec.rate_per_s if spec.waits and amount > 0 else None
        for spec, amount in zip(specs, amounts, strict=True)
    )


def adjust(tat: float | None, spec: BucketSpec, delta: float, now: float) -> float:
    """The TAT after settling ``delta`` units: an overrun (> 0) or a refund (< 0).

    An overrun is charged even when it drives the bucket below zero; that debt is repaid by
    refill before any positive take passes again. A refund never lifts the bucket above full,
    so it can never give back more than the bucket held before the reservation.
    """
    if math.isnan(delta):
        raise ValueError(f"bucket {spec.key!r}: delta must be a number")
    new = _start(tat, now) + delta / spec.rate_per_s
    if new < now:
        new = now
    return new
