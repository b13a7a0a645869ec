"""AIMD/gradient concurrency limit for backends without memory signals."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.adaptive import DEFAULT_INITIAL_LIMIT, AdaptiveLimit


def test_starts_at_max_concurrency_or_the_default() -> None:
    assert AdaptiveLimit(initial=64, max_limit=64).value == 64
    assert AdaptiveLimit().value == DEFAULT_INITIAL_LIMIT


def test_drop_backs_off_multiplicatively_once_per_cooldown() -> None:
    lim = AdaptiveLimit(initial=100, backoff=0.9, cooldown_s=1.0)
    lim.on_sample(ttft_s=None, inflight=50, dropped=True, now=0.0)
    assert lim.value == 90
    lim.on_drop(0.5)  # same burst
    assert lim.value == 90
    lim.on_drop(1.5)
    assert lim.value == 81


def test_grows_additively_only_when_used() -> None:
    lim = AdaptiveLimit(initial=10)
    lim.on_sample(ttft_s=0.1, inflight=2, dropped=False, now=0.0)
    assert lim.value == 10  # mostly idle: no evidence it can hold more
    lim.on_sample(ttft_s=0.1, inflight=6, dropped=False, now=0.0)
    assert lim.value == 11


def test_rising_ttft_counts_as_a_drop() -> None:
    lim = AdaptiveLimit(initial=100, tolerance=2.0, cooldown_s=0.0)
    for _ in range(20):
        lim.on_sample(ttft_s=0.1, inflight=100, dropped=False, now=0.0)
    grown = lim.value
    now = 1.0
    for _ in range(30):
        lim.on_sample(ttft_s=1.0, inflight=100, dropped=False, now=now)
        now += 1.0
    assert lim.value < grown


@given(
    st.lists(
        st.tuples(st.floats(0.001, 10.0) | st.none(), st.integers(0, 2000), st.booleans()),
        max_size=200,
    )
)
def test_limit_stays_within_bounds(samples: list[tuple[float | None, int, bool]]) -> None:
    lim = AdaptiveLimit(initial=16, max_limit=64, min_limit=2)
    for i, (ttft, inflight, dropped) in enumerate(samples):
        lim.on_sample(ttft_s=ttft, inflight=inflight, dropped=dropped, now=float(i))
        assert 2 <= lim.value <= 64
