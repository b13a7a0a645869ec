"""GCRA token buckets: worked examples with hand-checked numbers (fake time, no sleeps)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.bucket import (
    LINE_HORIZON_S,
    BucketSpec,
    adjust,
    level,
    places_of,
    try_take,
    turn_of,
)
from gateway.core.types import Unit

TOKENS = BucketSpec("t:acme:tokens", Unit.TOKENS, rate_per_s=10.0, burst=100.0)
REQUESTS = BucketSpec("t:acme:requests", Unit.REQUESTS, rate_per_s=1.0, burst=2.0)
NOW = 1000.0


def test_a_full_bucket_grants_its_burst_and_no_more() -> None:
    verdict, tats = try_take([None], [TOKENS], [100.0], NOW)
    assert verdict.allowed
    assert verdict.remaining == (0.0,)
    assert verdict.reset_s == (10.0,)
    assert tats == (NOW + 10.0,)
    refused, unchanged = try_take(list(tats), [TOKENS], [1.0], NOW)
    assert not refused.allowed
    assert unchanged is None
    assert refused.retry_after_s == pytest.approx(0.1)
    assert refused.blocking == 0
    assert not refused.never


def test_refill_is_linear_in_time() -> None:
    _, tats = try_take([None], [TOKENS], [100.0], NOW)
    assert tats is not None
    remaining, reset_s = level(tats[0], TOKENS, NOW + 2.5)
    assert remaining == pytest.approx(25.0)
    assert reset_s == pytest.approx(7.5)
    assert level(tats[0], TOKENS, NOW + 50.0) == (100.0, 0.0)


def test_weighted_take_waits_for_its_whole_amount() -> None:
    verdict, tats = try_take([None], [TOKENS], [70.0], NOW)
    assert verdict.allowed
    assert tats is not None
    refused, _ = try_take(list(tats), [TOKENS], [50.0], NOW)
    assert refused.retry_after_s == pytest.approx(2.0)  # 30 left, 20 more at 10/s
    allowed, _ = try_take(list(tats), [TOKENS], [50.0], NOW + refused.retry_after_s)
    assert allowed.allowed


def test_more_than_the_burst_can_never_pass() -> None:
    verdict, tats = try_take([None, None], [REQUESTS, TOKENS], [1.0, 101.0], NOW)
    assert not verdict.allowed
    assert verdict.never
    assert verdict.blocking == 1
    assert verdict.retry_after_s == math.inf
    assert tats is None
    assert verdict.remaining == (2.0, 100.0)


def test_all_or_nothing_reports_the_longest_wait() -> None:
    tats: list[float | None] = [NOW + 2.0, NOW + 5.0]  # requests empty, tokens at 50
    verdict, news = try_take(tats, [REQUESTS, TOKENS], [1.0, 80.0], NOW)
    assert not verdict.allowed
    assert news is None
    # requests: 1 more in 1 s; tokens: 30 more in 3 s -> the take waits 3 s for tokens
    assert verdict.blocking == 1
    assert verdict.retry_after_s == pytest.approx(3.0)
    assert verdict.remaining == pytest.approx((0.0, 50.0))


def test_zero_amount_passes_even_a_bucket_in_debt() -> None:
    in_debt = adjust(NOW, TOKENS, 150.0, NOW)  # an overrun of 150 on a full bucket
    assert level(in_debt, TOKENS, NOW)[0] == pytest.approx(-50.0)
    verdict, tats = try_take([in_debt], [TOKENS], [0.0], NOW)
    assert verdict.allowed
    assert tats == (in_debt,)
    refused, _ = try_take([in_debt], [TOKENS], [1e-6], NOW)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(5.0, abs=1e-6)  # the debt is repaid first


def test_refund_restores_but_never_above_full() -> None:
    _, tats = try_take([None], [TOKENS], [60.0], NOW)
    assert tats is not None
    refunded = adjust(tats[0], TOKENS, -40.0, NOW + 1.0)
    assert level(refunded, TOKENS, NOW + 1.0)[0] == pytest.approx(90.0)
    too_much = adjust(tats[0], TOKENS, -1000.0, NOW + 1.0)
    assert too_much == NOW + 1.0
    assert level(too_much, TOKENS, NOW + 1.0) == (100.0, 0.0)


def test_refund_of_a_full_bucket_is_a_no_op() -> None:
    assert adjust(None, TOKENS, -10.0, NOW) == NOW
    assert adjust(NOW - 5.0, TOKENS, -10.0, NOW) == NOW


def test_overrun_charges_a_partly_used_bucket() -> None:
    _, tats = try_take([None], [TOKENS], [40.0], NOW)
    assert tats is not None
    charged = adjust(tats[0], TOKENS, 25.0, NOW)
    assert level(charged, TOKENS, NOW)[0] == pytest.approx(35.0)


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        BucketSpec("k", Unit.TOKENS, rate_per_s=0.0, burst=1.0)
    with pytest.raises(ValueError, match="burst"):
        BucketSpec("k", Unit.TOKENS, rate_per_s=1.0, burst=math.inf)
    with pytest.raises(ValueError, match="amount"):
        try_take([None], [TOKENS], [-1.0], NOW)
    with pytest.raises(ValueError, match="amount"):
        try_take([None], [TOKENS], [math.nan], NOW)
    with pytest.raises(ValueError, match="same length"):
        try_take([None], [TOKENS, REQUESTS], [1.0, 1.0], NOW)
    with pytest.raises(ValueError, match="delta"):
        adjust(None, TOKENS, math.nan, NOW)


def test_no_buckets_always_allows() -> None:
    verdict, tats = try_take([], [], [], NOW)
    assert verdict.allowed
    assert tats == ()


WAITING = BucketSpec("t:a:*:tokens:60", Unit.TOKENS, rate_per_s=10.0, burst=100.0, waits=True)


def test_a_bucket_that_waits_passes_a_take_with_its_turn_instead_of_refusing() -> None:
    verdict, news = try_take([None], [WAITING], [100.0], 0.0, max_wait_s=30.0)
    assert verdict.allowed
    assert verdict.wait_s == 0.0
    assert news is not None
    # empty now: 50 more tokens refill in 5 s; with a budget of 30 s the take waits its turn
    verdict, news = try_take(list(news), [WAITING], [50.0], 0.0, max_wait_s=30.0)
    assert verdict.allowed
    assert verdict.wait_s == pytest.approx(5.0)
    assert news is not None
    # the bucket is 5 s in debt: a take whose turn would begin after its budget is refused,
    # and told when it would be granted its turn (in 2 s its turn begins 3 s later), not when
    # it would pass without waiting (15 s)
    refused, unchanged = try_take(list(news), [WAITING], [100.0], 0.0, max_wait_s=3.0)
    assert not refused.allowed
    assert unchanged is None
    assert refused.retry_after_s == pytest.approx(2.0)
    retried, _ = try_take(list(news), [WAITING], [100.0], refused.retry_after_s, max_wait_s=3.0)
    assert retried.allowed
    assert retried.wait_s == pytest.approx(13.0)
    # one whose turn begins within it is taken, though its end is later (its own refill time)
    late, _ = try_take(list(news), [WAITING], [100.0], 0.0, max_wait_s=5.0)
    assert late.allowed
    assert late.wait_s == pytest.approx(15.0)


def test_a_bucket_that_does_not_wait_refuses_whatever_the_budget() -> None:
    spec = BucketSpec("k", Unit.TOKENS, rate_per_s=10.0, burst=100.0)
    _, news = try_take([None], [spec], [100.0], 0.0, max_wait_s=30.0)
    assert news is not None
    verdict, _ = try_take(list(news), [spec], [50.0], 0.0, max_wait_s=30.0)
    assert not verdict.allowed


@given(st.lists(st.tuples(st.floats(1.0, 100.0), st.floats(0.0, 2.0)), min_size=1, max_size=40))
def test_waiting_takes_are_served_in_arrival_order_whatever_their_size(
    takes: list[tuple[float, float]],
) -> None:
    tat: float | None = None
    now = 0.0
    turns: list[float] = []
    for amount, gap in takes:
        now += gap
        verdict, news = try_take([tat], [WAITING], [amount], now, max_wait_s=1e6)
        assert verdict.allowed  # the budget is large: every take gets a turn
        assert news is not None
        tat = news[0]
        turns.append(now + verdict.wait_s)
    # each take goes on no earlier than the ones that arrived before it: a large one is never
    # passed by small ones that came after it
    assert all(a <= b + 1e-6 for a, b in itertools.pairwise(turns))


def test_a_refund_does_not_let_a_later_take_go_before_an_earlier_waiter() -> None:
    _, news = try_take([None], [WAITING], [100.0], 0.0, max_wait_s=30.0)  # empties the bucket
    assert news is not None
    first, news = try_take(list(news), [WAITING], [100.0], 0.0, max_wait_s=30.0)
    assert first.wait_s == pytest.approx(10.0)
    assert news is not None
    turn = turn_of(first, 0.0)
    assert turn == pytest.approx(10.0)
    # the request that emptied the bucket used 20 of its 100: 80 come back, the TAT moves 8 s
    tat = adjust(news[0], WAITING, -80.0, 1.0)
    # by the TAT alone a take of 10 would go at 3 s, 7 s before the waiter that came first
    alone, _ = try_take([tat], [WAITING], [10.0], 1.0, max_wait_s=30.0)
    assert alone.wait_s == pytest.approx(2.0)
    later, _ = try_take([tat], [WAITING], [10.0], 1.0, max_wait_s=30.0, turns=[turn])
    assert later.allowed
    assert later.wait_s == pytest.approx(9.0)  # at 10 s with the earlier waiter, not before
    # its turn begins at 10 s, whatever its size: one that may wait only 2 s is refused and
    # told when its turn would be granted
    short, _ = try_take([tat], [WAITING], [10.0], 1.0, max_wait_s=2.0, turns=[turn])
    assert not short.allowed
    assert short.retry_after_s == pytest.approx(7.0)
    retried, _ = try_take([tat], [WAITING], [10.0], 8.0, max_wait_s=2.0, turns=[turn])
    assert retried.allowed
    assert retried.wait_s == pytest.approx(2.0)


def test_a_turn_is_booked_only_by_a_take_that_waits() -> None:
    now_, passes = try_take([None], [WAITING], [50.0], 0.0, max_wait_s=30.0)
    assert now_.allowed
    assert turn_of(now_, 0.0) is None  # it goes at once: there is no turn to keep
    refused, _ = try_take([None], [WAITING], [500.0], 0.0, max_wait_s=30.0)
    assert turn_of(refused, 0.0) is None
    assert passes is not None
    waits, _ = try_take(list(passes), [WAITING], [100.0], 0.0, max_wait_s=30.0)
    assert turn_of(waits, 0.0) == pytest.approx(5.0)


def _queued(tat_ahead_s: float) -> tuple[list[float | None], list[float | None]]:
    """A WAITING bucket at 0 s whose queue is ``tat_ahead_s`` past the tolerance: a take may
    begin its turn in that many seconds (the TAT and the turn agree)."""
    tat = tat_ahead_s + WAITING.burst / WAITING.rate_per_s
    return [tat], [tat_ahead_s]


def test_refused_takes_are_told_their_own_places_not_one_moment() -> None:
    tats, turns = _queued(10.0)
    lines: list[float | None] = [None]
    told = []
    for amount in (20.0, 50.0, 10.0):
        refused, unchanged = try_take(tats, [WAITING], [amount], 0.0, 2.0, turns, lines)
        assert not refused.allowed
        assert unchanged is None  # a place changes neither the TAT nor the turn
        told.append(refused.retry_after_s)
        places = places_of(refused, [WAITING], [amount], 0.0)
        assert places is not None
        lines = list(places)
    # the queue has room for each in 8 s; the second is told after the first's 2 s of refill,
    # the third after the second's 5 s: not all three at 8 s, when only one could pass
    assert told == pytest.approx([8.0, 10.0, 15.0])
    assert lines == pytest.approx([16.0])
    # without a line (a store that keeps none) every one is told the same moment
    alone, _ = try_take(tats, [WAITING], [50.0], 0.0, 2.0, turns)
    assert alone.retry_after_s == pytest.approx(8.0)


def test_a_place_is_given_within_the_horizon_only() -> None:
    tats, turns = _queued(LINE_HORIZON_S + 5.0)
    refused, _ = try_take(tats, [WAITING], [10.0], 0.0, 1.0, turns, [None])
    assert refused.retry_after_s == pytest.approx(LINE_HORIZON_S + 4.0)
    assert places_of(refused, [WAITING], [10.0], 0.0) is None  # told, but it takes no place
    near, _ = try_take(tats, [WAITING], [10.0], 0.0, 6.0, turns, [None])
    assert places_of(near, [WAITING], [10.0], 0.0) == pytest.approx((LINE_HORIZON_S,))
    # nothing to book for a take that passes or can never pass
    passes, _ = try_take([None], [WAITING], [10.0], 0.0, 1.0, [None], [5.0])
    assert passes.allowed
    assert places_of(passes, [WAITING], [10.0], 0.0) is None
    never, _ = try_take(tats, [WAITING], [500.0], 0.0, 1.0, turns, [5.0])
    assert places_of(never, [WAITING], [500.0], 0.0) is None


def test_a_place_is_booked_on_the_buckets_that_wait_only() -> None:
    tats, turns = _queued(10.0)
    specs = [REQUESTS, WAITING]
    refused, _ = try_take([None, tats[0]], specs, [1.0, 20.0], 0.0, 2.0, [None, turns[0]])
    assert places_of(refused, specs, [1.0, 20.0], 0.0) == (None, pytest.approx(10.0))
    # another bucket's longer wait decides when it comes back, and so where its place begins
    in_debt = NOW + 20.0
    slow, _ = try_take([in_debt, tats[0]], specs, [1.0, 20.0], NOW, 2.0, [None, turns[0]])
    assert slow.blocking == 0
    assert places_of(slow, specs, [1.0, 20.0], NOW) == (
        None,
        pytest.approx(NOW + slow.retry_after_s + 2.0),
    )
