"""Online output-length quantiles for "likely" reservations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.outputs import OutputLengths


def test_before_enough_samples_reserves_max_tokens() -> None:
    o = OutputLengths(quantile=0.9, min_samples=5)
    for n in (10, 20, 30, 40):
        o.observe("m", "t", n)
    assert o.likely("m", "t", 1000) == 1000


def test_quantile_of_observed_lengths_capped_by_max_tokens() -> None:
    o = OutputLengths(quantile=0.9, min_samples=10)
    for n in range(1, 101):
        o.observe("m", "t", n)
    assert o.likely("m", "t", 1000) == 90
    assert o.likely("m", "t", 50) == 50


def test_tenant_without_samples_uses_the_models_pool() -> None:
    o = OutputLengths(quantile=0.5, min_samples=3)
    for n in (100, 200, 300):
        o.observe("m", "a", n)
    assert o.likely("m", "b", 1000) == 200
    assert o.likely("other", "b", 1000) == 1000


def test_window_forgets_old_samples() -> None:
    o = OutputLengths(quantile=1.0, window=10, min_samples=1)
    o.observe("m", "t", 5000)
    for _ in range(10):
        o.observe("m", "t", 7)
    assert o.likely("m", "t", 9999) == 7


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=200), st.integers(1, 20_000))
def test_likely_is_a_sample_or_max_tokens_and_never_above_max(
    samples: list[int], max_tokens: int
) -> None:
    o = OutputLengths(quantile=0.9, min_samples=1)
    for n in samples:
        o.observe("m", "t", n)
    got = o.likely("m", "t", max_tokens)
    assert got <= max_tokens
    assert got == max_tokens or got in samples
