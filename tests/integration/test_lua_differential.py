"""The Lua scripts and ``gateway.core.bucket`` are twins: the same operations, with the same
caller-given time, must give the same verdicts and the same bucket levels, bit for bit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.bucket import BucketSpec, adjust, level, places_of, try_take, turn_of
from gateway.core.types import Unit
from gateway.store.redis import (
    CALLER_CLOCK_MIN_TTL_S,
    acquire_args,
    acquire_keys,
    adjust_args,
    bucket_key,
    peek_args,
    script_source,
    verdict_from_reply,
)

pytestmark = [pytest.mark.integration, pytest.mark.redis]

MIN_TTL_MS = int(CALLER_CLOCK_MIN_TTL_S * 1000)


class Scripts:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.acquire = client.register_script(script_source("acquire"))
        self.adjust = client.register_script(script_source("adjust"))
        self.peek = client.register_script(script_source("peek"))


@pytest.fixture(scope="module")
def scripts(redis_url: str) -> Iterator[Scripts]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield Scripts(client)
    finally:
        client.close()


fractions = st.floats(min_value=0.0, max_value=1.0)
bucket_params = st.tuples(
    st.floats(min_value=0.01, max_value=1e4),
    st.floats(min_value=0.1, max_value=1e5),
    st.booleans(),  # the bucket lets a take wait for its turn
)
triples = st.tuples(fractions, fractions, fractions)
ops = st.lists(
    st.tuples(st.sampled_from(["take", "take", "adjust", "advance", "peek"]), triples),
    min_size=1,
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(bucket_params, min_size=1, max_size=3), ops)
@example(  # a refund while a take waits its turn, then a small take: the turn binds
    params=[(10.0, 100.0, True)],
    steps=[
        ("take", (0.8, 0.0, 0.0)),
        ("take", (0.8, 1.0, 0.0)),
        ("adjust", (0.1, 0.0, 0.0)),
        ("take", (0.1, 1.0, 0.0)),
        ("take", (0.1, 0.1, 0.0)),
    ],
)
@example(  # refused takes one after another: each is told its own place in the line of retries
    params=[(10.0, 100.0, True)],
    steps=[
        ("take", (1.0, 0.0, 0.0)),
        ("take", (0.5, 0.1, 0.0)),
        ("take", (0.8, 0.1, 0.0)),
        ("take", (0.3, 0.1, 0.0)),
        ("advance", (0.4, 0.0, 0.0)),
        ("take", (0.3, 0.1, 0.0)),
    ],
)
def test_lua_matches_core_bucket(
    scripts: Scripts,
    params: list[tuple[float, float, bool]],
    steps: list[tuple[str, tuple[float, float, float]]],
) -> None:
    prefix = f"diff-{uuid.uuid4().hex[:12]}"
    specs = [
        BucketSpec(f"b{i}", Unit.TOKENS, rate, burst, waits)
        for i, (rate, burst, waits) in enumerate(params)
    ]
    keys = [bucket_key(prefix, spec) for spec in specs]
    both = acquire_keys(prefix, specs)
    longest_s = max(spec.burst / spec.rate_per_s for spec in specs)
    tats: list[float | None] = [None] * len(specs)
    turns: list[float | None] = [None] * len(specs)
    lines: list[float | None] = [None] * len(specs)
    now = 1000.0
    try:
        for kind, fracs in steps:
            if kind == "advance":
                now += fracs[0] * fracs[0] * 1.5 * longest_s
            elif kind == "take":
                amounts = [
                    0.0 if f < 0.1 else f * 1.2 * s.burst
                    for f, s in zip(fracs, specs, strict=False)
                ]
                max_wait_s = fracs[1] * longest_s  # some takes wait their turn, some may not
                expected, news = try_take(tats, specs, amounts, now, max_wait_s, turns, lines)
                reply = scripts.acquire(
                    keys=both, args=acquire_args(specs, amounts, now, MIN_TTL_MS, max_wait_s)
                )
                assert verdict_from_reply(reply, len(specs)) == expected
                places = places_of(expected, specs, amounts, now)
                if places is not None:
                    lines = [
                        old if place is None else place
                        for place, old in zip(places, lines, strict=True)
                    ]
                if news is not None:
                    tats = [new if new > now else tat for new, tat in zip(news, tats, strict=True)]
                    turn = turn_of(expected, now)
                    if turn is not None:
                        turns = [
                            turn if spec.waits and amount > 0 else old
                            for spec, amount, old in zip(specs, amounts, turns, strict=True)
                        ]
            elif kind == "adjust":
                deltas = [(2 * f - 1) * s.burst for f, s in zip(fracs, specs, strict=False)]
                scripts.adjust(keys=keys, args=adjust_args(specs, deltas, now, MIN_TTL_MS))
                tats = [
                    tat if delta == 0 else adjust(tat, spec, delta, now)
                    for tat, spec, delta in zip(tats, specs, deltas, strict=True)
                ]
            reply = scripts.peek(keys=keys, args=peek_args(specs, now))
            lua_levels = tuple(float(item) for item in reply)
            assert lua_levels == tuple(
                level(t, s, now)[0] for t, s in zip(tats, specs, strict=True)
            )
    finally:
        scripts.client.delete(*both)


def test_lua_scripts_open_with_a_units_comment() -> None:
    for name in ("acquire", "adjust", "peek"):
        assert script_source(name).startswith("-- units: ")
