"""Time for the pure core: a protocol, the real monotonic clock, and a fake one for tests.

Everything in ``gateway.core`` takes ``now`` (seconds, monotonic) as an argument; only the I/O
edges read a ``Clock``. Wall-clock time is used for HTTP headers only, never for limits.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale; only differences are meaningful."""
        ...


class MonotonicClock:
    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to; tests drive it with ``advance``."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        self._now += seconds
