"""Invariants of the GCRA buckets, over random sequences of takes, settlements and time steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.bucket import (
    EPSILON_S,
    LINE_HORIZON_S,
    BucketSpec,
    adjust,
    level,
    places_of,
    try_take,
    turn_of,
)
from gateway.core.types import Unit

START = 1000.0
RETRY_PROBE_S = 10 * EPSILON_S

rates = st.floats(min_value=0.01, max_value=1e4)
bursts = st.floats(min_value=0.1, max_value=1e5)
fractions = st.floats(min_value=0.0, max_value=1.0)

# An op is (kind, x, y): x and y are fractions scaled by the bucket (see _run).
ops = st.lists(
    st.tuples(st.sampled_from(["take", "advance", "refund", "overrun"]), fractions, fractions),
    max_size=40,
)


@dataclass
class Run:
    spec: BucketSpec
    now: float = START
    tat: float | None = None
    overran: bool = False
    reservations: list[float] = field(default_factory=list)
    events: list[tuple[float, float]] = field(default_factory=list)  # (time, net amount admitted)

    def remaining(self) -> float:
        return level(self.tat, self.spec, self.now)[0]


def _tolerance(spec: BucketSpec, window_s: float = 0.0) -> float:
    return 1e-9 * (spec.burst + spec.rate_per_s * window_s) + spec.rate_per_s * 2 * EPSILON_S


def _step(run: Run, kind: str, x: float, y: float) -> None:
    spec = run.spec
    tau = spec.burst / spec.rate_per_s
    before = run.remaining()
    if kind == "advance":
        run.now += x * x * 2 * tau
    elif kind == "take":
        amount = 0.0 if x < 0.05 else x * 1.2 * spec.burst
        verdict, tats = try_take([run.tat], [spec], [amount], run.now)
        if verdict.allowed:
            assert tats is not None
            run.tat = tats[0]
            run.reservations.append(amount)
            run.events.append((run.now, amount))
            if amount > 0:
                assert run.remaining() >= -_tolerance(spec), "a take drove the bucket below zero"
        else:
            assert tats is None
            assert amount > 0, "an amount of 0 must always pass"
            assert verdict.never == (amount > spec.burst)
            _check_retry_after(run, amount, verdict.retry_after_s, verdict.never)
    elif kind == "refund" and run.reservations:
        reserved = run.reservations.pop(int(x * len(run.reservations)) % len(run.reservations))
        refund = y * reserved
        run.tat = adjust(run.tat, spec, -refund, run.now)
        run.events.append((run.now, -refund))
        after = run.remaining()
        assert after <= before + refund + _tolerance(spec), "a refund gave back more than it had"
    elif kind == "overrun":
        run.tat = adjust(run.tat, spec, x * spec.burst, run.now)
        run.overran = True
    remaining = run.remaining()
    assert remaining <= spec.burst + _tolerance(spec)
    if remaining < -_tolerance(spec):
        assert run.overran, "only a settled overrun can leave a bucket below zero"
        debt_verdict, _ = try_take([run.tat], [spec], [spec.burst * 1e-6], run.now)
        assert not debt_verdict.allowed, "a bucket in debt let a take through"
    zero_verdict, _ = try_take([run.tat], [spec], [0.0], run.now)
    assert zero_verdict.allowed


def _check_retry_after(run: Run, amount: float, retry_after_s: float, never: bool) -> None:
    spec = run.spec
    if never:
        return
    assert retry_after_s > 0
    later, _ = try_take([run.tat], [spec], [amount], run.now + retry_after_s)
    assert later.allowed, "waiting retry_after_s was not enough"
    if retry_after_s > 2 * RETRY_PROBE_S:
        early, _ = try_take([run.tat], [spec], [amount], run.now + retry_after_s - RETRY_PROBE_S)
        assert not early.allowed, "retry_after_s was longer than needed"


def _check_windows(run: Run) -> None:
    """Net admitted (takes less refunds) over every window <= rate x window + burst."""
    spec = run.spec
    events = run.events
    for i in range(len(events)):
        net = 0.0
        for j in range(i, len(events)):
            net += events[j][1]
            window_s = events[j][0] - events[i][0]
            bound = spec.rate_per_s * window_s + spec.burst
            assert net <= bound + _tolerance(spec, window_s), (i, j, net, bound)


@settings(max_examples=300, deadline=None)
@given(rates, bursts, ops)
def test_single_bucket_invariants(
    rate: float, burst: float, steps: list[tuple[str, float, float]]
) -> None:
    run = Run(BucketSpec("k", Unit.TOKENS, rate, burst))
    for kind, x, y in steps:
        _step(run, kind, x, y)
    _check_windows(run)


specs3 = st.lists(st.tuples(rates, bursts), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(specs3, st.lists(st.tuples(fractions, fractions, fractions, fractions), max_size=25))
def test_multi_bucket_take_is_all_or_nothing(
    params: list[tuple[float, float]], steps: list[tuple[float, float, float, float]]
) -> None:
    specs = [
        BucketSpec(f"k{i}", Unit.TOKENS, rate, burst) for i, (rate, burst) in enumerate(params)
    ]
    tats: list[float | None] = [None] * len(specs)
    now = START
    for dt, a, b, c in steps:
        now += dt * dt * max(s.burst / s.rate_per_s for s in specs)
        scale = (a, b, c)
        amounts = [scale[i] * 1.1 * spec.burst for i, spec in enumerate(specs)]
        before = [level(tat, spec, now)[0] for tat, spec in zip(tats, specs, strict=True)]
        verdict, news = try_take(tats, specs, amounts, now)
        assert len(verdict.remaining) == len(specs) == len(verdict.reset_s)
        if verdict.allowed:
            assert news is not None
            tats = list(news)
            for i, spec in enumerate(specs):
                after = level(tats[i], spec, now)[0]
                assert after == _approx(before[i] - amounts[i], spec)
                assert verdict.remaining[i] == _approx(after, spec)
        else:
            assert news is None  # a refused take changes no bucket
            assert verdict.blocking is not None
            assert verdict.remaining == tuple(
                _approx(r, s) for r, s in zip(before, specs, strict=True)
            )
            waits = [
                (tats[i] or now) + amounts[i] / spec.rate_per_s - spec.burst / spec.rate_per_s - now
                for i, spec in enumerate(specs)
            ]
            if verdict.never:
                assert amounts[verdict.blocking] > specs[verdict.blocking].burst
            else:
                assert verdict.retry_after_s == _approx(max(waits), specs[verdict.blocking])
                retry, _ = try_take(tats, specs, amounts, now + verdict.retry_after_s)
                assert retry.allowed


class _approx:
    """Like pytest.approx, with the bucket's tolerance."""

    def __init__(self, value: float, spec: BucketSpec) -> None:
        self.value = value
        self.tolerance = _tolerance(spec) + 1e-9 * abs(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and abs(other - self.value) <= self.tolerance

    def __repr__(self) -> str:
        return f"{self.value} ± {self.tolerance}"


@dataclass
class Waiting:
    """A bucket that waits, driven like a gateway drives it: takes that wait their turn,
    settlements (refunds and overruns) of the takes granted, and time steps."""

    spec: BucketSpec
    now: float = START
    tat: float | None = None
    turn: float | None = None
    line: float | None = None
    held: list[float] = field(default_factory=list)  # what each granted take still holds
    debited: float = 0.0  # takes plus overruns, and what was refunded of them
    refunded: float = 0.0
    goes: list[float] = field(default_factory=list)  # when each granted take goes on, in order

    def take(self, amount: float, max_wait_s: float) -> None:
        spec = self.spec
        state = ([self.tat], [spec])
        verdict, news = try_take(*state, [amount], self.now, max_wait_s, [self.turn], [self.line])
        if 0 < amount <= spec.burst:
            # whether a turn is granted, and when a refused take is told to come back, do not
            # depend on the size of the take
            tiny_amount = spec.burst * 1e-3
            tiny, _ = try_take(
                *state, [tiny_amount], self.now, max_wait_s, [self.turn], [self.line]
            )
            assert tiny.allowed == verdict.allowed, "the grant of a turn depended on its size"
            if not verdict.allowed:
                assert tiny.retry_after_s == self.seconds(verdict.retry_after_s, max_wait_s)
        if not verdict.allowed:
            assert news is None
            self.check_retry_after(amount, max_wait_s, verdict.retry_after_s, verdict.never)
            places = places_of(verdict, [spec], [amount], self.now)
            if places is None:
                assert verdict.never or verdict.retry_after_s > LINE_HORIZON_S
            else:
                # the next refused take is told to come back after this one's place
                end = self.now + verdict.retry_after_s + amount / spec.rate_per_s
                assert places[0] == self.seconds(end, max_wait_s)
                self.line = places[0]
            return
        assert news is not None
        self.tat = news[0]
        if amount == 0:
            assert verdict.wait_s == 0, "an amount of 0 waits for nothing"
            return
        self.turn = turn_of(verdict, self.now) or self.turn
        self.goes.append(self.now + verdict.wait_s)
        self.held.append(amount)
        self.debited += amount
        # the documented debt: at most max_wait_s of refill plus the take itself (a settled
        # overrun may leave more, until the TAT is back within a take's budget)
        debt = spec.rate_per_s * max_wait_s + amount
        assert level(self.tat, spec, self.now)[0] >= -debt - _tolerance(spec, max_wait_s)
        # and it goes on within its budget plus its own refill time
        assert verdict.wait_s <= max_wait_s + amount / spec.rate_per_s + 2 * EPSILON_S

    def seconds(self, value: float, max_wait_s: float) -> object:
        """``value`` (seconds) within the float rounding of the times it was computed from."""
        scale = self.now + 4 * self.spec.burst / self.spec.rate_per_s + max_wait_s
        return pytest.approx(value, rel=0, abs=1e-12 * scale + 2 * EPSILON_S)

    def check_retry_after(
        self, amount: float, max_wait_s: float, retry_after_s: float, never: bool
    ) -> None:
        if never:
            assert amount > self.spec.burst
            return
        assert retry_after_s > 0
        turns = [self.turn]
        later, _ = try_take(
            [self.tat], [self.spec], [amount], self.now + retry_after_s, max_wait_s, turns
        )
        assert later.allowed, "waiting retry_after_s was not enough to be granted a turn"
        if self.line is not None and self.line - self.now >= retry_after_s - RETRY_PROBE_S:
            return  # told to wait for its place in the line, not only for room in the queue
        if retry_after_s > 2 * RETRY_PROBE_S:
            early_s = self.now + retry_after_s - RETRY_PROBE_S
            early, _ = try_take([self.tat], [self.spec], [amount], early_s, max_wait_s, turns)
            assert not early.allowed, "retry_after_s was longer than needed"

    def settle(self, which: float, used: float) -> None:
        if not self.held:
            return
        reserved = self.held.pop(int(which * len(self.held)) % len(self.held))
        delta = (2 * used - 0.5) * reserved  # from a refund of half the reservation to an overrun
        before = level(self.tat, self.spec, self.now)[0]
        self.tat = adjust(self.tat, self.spec, delta, self.now)
        after = level(self.tat, self.spec, self.now)[0]
        if delta < 0:
            self.refunded -= delta
            assert after <= before - delta + _tolerance(self.spec), "a refund gave back more"
        else:
            self.debited += delta
        assert self.refunded <= self.debited + _tolerance(self.spec)
        assert after <= self.spec.burst + _tolerance(self.spec)


@settings(max_examples=300, deadline=None)
@given(
    rates,
    bursts,
    st.lists(
        st.tuples(st.sampled_from(["take", "take", "advance", "settle"]), fractions, fractions),
        max_size=40,
    ),
)
def test_waiting_bucket_is_fifo_and_keeps_its_debt(
    rate: float, burst: float, steps: list[tuple[str, float, float]]
) -> None:
    spec = BucketSpec("k", Unit.TOKENS, rate, burst, waits=True)
    tau = burst / rate
    run = Waiting(spec)
    for kind, x, y in steps:
        if kind == "advance":
            run.now += x * x * 2 * tau
        elif kind == "take":
            run.take(0.0 if x < 0.05 else x * 1.2 * burst, y * 3 * tau)
        else:
            run.settle(x, y)
    # FIFO: a take granted later never goes on before one granted earlier, refunds or not
    slack = 2 * EPSILON_S + 1e-12 * run.now
    assert all(a <= b + slack for a, b in zip(run.goes, run.goes[1:], strict=False))


@settings(max_examples=300, deadline=None)
@given(
    rates,
    bursts,
    fractions,
    fractions,
    st.lists(st.floats(min_value=1e-3, max_value=1.0), min_size=1, max_size=20),
)
def test_refused_takes_that_come_back_when_told_are_all_granted(
    rate: float, burst: float, queue: float, budget: float, sizes: list[float]
) -> None:
    """Takes refused one after another are told apart: when each comes back at the time it was
    told, in that order, the queue has room for it (the ones before it took theirs). Told the
    same moment, as without a line, all but one would be refused again."""
    spec = BucketSpec("k", Unit.TOKENS, rate, burst, waits=True)
    tau = burst / rate
    max_wait_s = budget * 3 * tau
    now = START
    # a queue whose turns begin up to 3 tau past the budget: every take below is refused
    ahead = max_wait_s + 10 * RETRY_PROBE_S + queue * 3 * tau
    tat: float | None = now + tau + ahead
    turn: float | None = now + ahead
    line: float | None = None
    told: list[tuple[float, float]] = []
    for size in sizes:
        amount = size * burst
        verdict, _ = try_take([tat], [spec], [amount], now, max_wait_s, [turn], [line])
        assert not verdict.allowed
        places = places_of(verdict, [spec], [amount], now)
        if places is None:
            assert verdict.retry_after_s > LINE_HORIZON_S
            continue  # no place: told when the line ends, like any other take then
        if line is not None:
            assert now + verdict.retry_after_s >= line - RETRY_PROBE_S  # after the last place
        line = places[0]
        told.append((now + verdict.retry_after_s, amount))
    for back, amount in told:
        verdict, news = try_take([tat], [spec], [amount], back, max_wait_s, [turn], [line])
        assert verdict.allowed, "a take that came back when told was refused again"
        assert news is not None
        tat = news[0]
        turn = turn_of(verdict, back) or turn
