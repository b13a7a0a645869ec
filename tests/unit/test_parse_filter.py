"""Keeping only the needed lines of a metrics page changes no signal: every flavor, on a
vLLM-sized page and on pages mixed from every flavor's names with labels and noise."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backends.flavors import metric_map
from gateway.backends.parse import parse_metrics, samples
from gateway.core.backend import Signals
from loadtest.bench_scrape import vllm_like_page

NAMES = sorted(
    {
        n
        for s in Signals
        for group in dataclasses.astuple(metric_map(s))
        if isinstance(group, tuple)
        for n in group
    }
)


def _unfiltered(text: str, signals: Signals) -> object:
    """What parse_metrics answered before the filter: the same reading of every sample."""
    with mock.patch("gateway.backends.parse._needed_or_all", lambda text, names: text):
        return parse_metrics(text, metric_map(signals), at=0.0, block_size=16)


@pytest.mark.parametrize("signals", list(Signals))
def test_a_vllm_sized_page_reads_the_same(signals: Signals) -> None:
    page = vllm_like_page()
    assert len(page.splitlines()) >= 570
    assert parse_metrics(page, metric_map(signals), at=0.0, block_size=16) == _unfiltered(
        page, signals
    )


line = st.tuples(
    st.sampled_from([*NAMES, "vllm:other", "vllm:num_requests_running_x", "process_open_fds"]),
    st.sampled_from(["", '{model_name="m"}', '{tp_rank="1"}', '{priority="high"}']),
    st.floats(0, 1e6, allow_nan=False),
)


@given(st.lists(line, max_size=30), st.sampled_from(list(Signals)))
def test_any_page_reads_the_same(rows: list[tuple[str, str, float]], signals: Signals) -> None:
    seen: set[tuple[str, str]] = set()
    lines = []
    for name, labels, value in rows:
        if (name, labels) not in seen:  # one sample per series, as a real page has
            seen.add((name, labels))
            lines.append(f"{name}{labels} {value}")
    page = "\n".join(lines) + "\n"
    samples(page)  # a well-formed page
    assert parse_metrics(page, metric_map(signals), at=0.0, block_size=16) == _unfiltered(
        page, signals
    )
