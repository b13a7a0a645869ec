"""The in-process limit store: the embedded default for one gateway, and the test double.

State is a dict of bucket key to TAT on the injected clock, and two of waiting bucket key to its
last turn given (``gateway.core.bucket.turn_of``) and to its line of retries (``places_of``). A
bucket whose TAT is in the past is full and needs no state, nor does a turn or a line in the past,
so such keys are dropped: on every write, and by an occasional sweep whose cost is amortised over
the writes that grew the dicts (memory stays within about twice the number of buckets that are not
full, plus a constant). Calls never suspend, so each is atomic on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.core.bucket import BucketSpec, Verdict, adjust, level, places_of, try_take, turn_of
from gateway.core.clock import Clock

_MIN_SWEEP_SIZE = 1024


class MemoryLimitStore:
    """A ``LimitStore`` in a dict; ``clock`` gives ``now`` (seconds) for every decision."""

    __slots__ = ("_clock", "_lines", "_sweep_at", "_tats", "_turns")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._turns: dict[str, float] = {}
        self._lines: dict[str, float] = {}
        self._sweep_at = _MIN_SWEEP_SIZE

    def __len__(self) -> int:
        """Times held: TATs of buckets not known to be full, turns and lines not yet past."""
        return len(self._tats) + len(self._turns) + len(self._lines)

    @property
    def degraded(self) -> bool:
        return False

    def acquire_now(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        now = self._clock.now()
        tats = self._tats
        current = [tats.get(spec.key) for spec in specs]
        turns: list[float | None] | None = None
        lines: list[float | None] | None = None
        if any(spec.waits for spec in specs):
            turns = [self._turns.get(spec.key) if spec.waits else None for spec in specs]
            lines = [self._lines.get(spec.key) if spec.waits else None for spec in specs]
        verdict, news = try_take(current, specs, amounts, now, max_wait_s, turns, lines)
        # try_take checked the lengths: not strict=True below, slow on 3.11
        if news is None:
            places = places_of(verdict, specs, amounts, now) if lines is not None else None
            if places is not None:
                for spec, place in zip(specs, places, strict=False):
                    if place is not None:
                        self._store(self._lines, spec.key, place, now)
        else:
            for spec, new in zip(specs, news, strict=False):
                self._store(tats, spec.key, new, now)
            turn = turn_of(verdict, now)
            if turn is not None:
                for spec, amount in zip(specs, amounts, strict=False):
                    if spec.waits and amount > 0:
                        self._store(self._turns, spec.key, turn, now)
        return verdict

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        if len(specs) != len(deltas):
            raise ValueError("specs and deltas must have the same length")
        now = self._clock.now()
        tats = self._tats
        for spec, delta in zip(specs, deltas, strict=False):
            if delta:
                self._store(tats, spec.key, adjust(tats.get(spec.key), spec, delta, now), now)
        return True

    def peek_now(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        """``peek`` without suspending (only this store can always answer so)."""
        now = self._clock.now()
        return tuple(level(self._tats.get(spec.key), spec, now)[0] for spec in specs)

    async def acquire(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        return self.acquire_now(specs, amounts, max_wait_s)

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        self.adjust_now(specs, deltas)

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        return self.peek_now(specs)

    async def close(self) -> None:
        self._tats.clear()
        self._turns.clear()
        self._lines.clear()

    def _store(self, times: dict[str, float], key: str, time: float, now: float) -> None:
        if time > now:
            times[key] = time
            if len(times) >= self._sweep_at:
                self._sweep(now)
        else:
            times.pop(key, None)

    def _sweep(self, now: float) -> None:
        every = (self._tats, self._turns, self._lines)
        for times in every:
            for key in [key for key, time in times.items() if time <= now]:
                del times[key]
        self._sweep_at = max(_MIN_SWEEP_SIZE, *(2 * len(times) for times in every))
