"""Usable capacity of one backend, and whether a request fits there. Pure: time is an argument.

A backend's capacity has one of three kinds:
- ``BYTES`` (its KV size is known, from ``kv_capacity`` or its metrics):
  ``usable = capacity * (1 - headroom) * warm-up factor * pressure``;
  ``free = min(usable * overcommit - reserved - foreign, usable - measured usage - admitted
  since the scrape + freed since the scrape)`` (freed: the KV held by requests the scrape saw
  running that have ended since, which their backend has freed already) where ``reserved`` is
  what this gateway's requests in flight there hold, ``foreign`` is usage the gauge shows
  beyond what we had reserved at the scrape (another gateway, or our estimates running over),
  and ``overcommit`` (``gateway.core.overcommit``, 1 but for paged backends) lets reservations
  exceed usable while the measured usage stays under it. Without a fresh usage gauge:
  ``free = usable - reserved``.
  A request needing more than a reported largest free block does not go there (it waits;
  ageing reserves room for it). Where only a fragmentation ratio is reported, the fragmented
  share of free memory is unusable, and a *large* request (over ``large_request`` of usable)
  avoids a backend whose ratio is above ``shed_above``.
- ``SLOTS`` (llama.cpp): a whole slot per request; usable = slots * warm-up * pressure.
- ``CONCURRENCY`` (no memory signal, no configured size): the adaptive limit of
  ``gateway.core.adaptive``.
Signals older than ``stale_after_s`` are ignored: the gateway's own accounting against the last
known capacity decides, so a silent metrics endpoint never freezes the pool.

A backend whose scrape shows a queue of its own (requests waiting inside it) gets no more in
flight than it runs plus a tenth: more would only wait there, out of the gateway's
order and deadlines (``BackendRuntime.room``).

Inferred pressure (``Pressure``): a rise of the preemption counter, KV usage ≥ 95 % while the
backend's waiting queue grows, or an OOM reported by the proxy each multiply the effective
capacity by ``cut`` (at most once a second), and it recovers linearly by ``recover_per_s``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec

from gateway.core.types import Phase


class CapacityKind(enum.StrEnum):
    BYTES = "bytes"
    SLOTS = "slots"
    CONCURRENCY = "concurrency"


@dataclass(frozen=True, slots=True)
class CapacityConfig:
    """Admission-wide capacity settings (shares in [0, 1], durations in seconds)."""

    headroom: float = 0.1
    warmup_floor: float = 0.1
    stale_after_s: float = 5.0
    shed_above: float = 0.5  # fragmentation ratio above which large requests avoid a backend
    large_request: float = 0.1  # "large": needs more than this share of the usable KV
    eject_failures: int = 3
    eject_cooldown_s: float = 10.0


class CapacityView(msgspec.Struct, frozen=True, gc=False):
    """A backend's capacity at one instant; units are bytes for BYTES, requests otherwise."""

    kind: CapacityKind
    phase: Phase
    total: float
    usable: float
    free: float
    fragmentation: float | None
    largest_free_bytes: float | None
    stale: bool


class Room(msgspec.Struct, frozen=True, gc=False):
    """Room for one more request on a backend at one instant: a request fits when its bytes
    are at most ``max_need``. ``free`` is bytes when ``by_bytes``, else whole requests."""

    max_need: float
    free: float
    by_bytes: bool

    def score(self, need_bytes: int) -> float | None:
        """Free bytes left after placing the request, or None when it does not fit.

        For slot and concurrency backends (no byte measure) the score is the number of such
        requests that would still fit, times the request's bytes, so pools compare in bytes.
        """
        if need_bytes > self.max_need:
            return None
        return self.free - need_bytes if self.by_bytes else (self.free - 1) * need_bytes


class Pressure:
    """A multiplicative capacity cut that recovers linearly with time."""

    __slots__ = ("_at", "_value", "cut_factor", "floor", "min_interval_s", "recover_per_s")

    def __init__(
        self,
        *,
        cut_factor: float = 0.8,
        floor: float = 0.3,
        recover_per_s: float = 0.02,
        min_interval_s: float = 1.0,
    ) -> None:
        self.cut_factor = cut_factor
        self.floor = floor
        self.recover_per_s = recover_per_s
        self.min_interval_s = min_interval_s
        self._value = 1.0
        self._at = float("-inf")

    def value(self, now: float) -> float:
        if self._value >= 1.0:
            return 1.0
        return min(1.0, self._value + self.recover_per_s * (now - self._at))

    def cut(self, now: float) -> None:
        if now - self._at < self.min_interval_s:
            return
        self._value = max(self.floor, self.value(now) * self.cut_factor)
        self._at = now


def round_up_tokens(tokens: int, block_size: int) -> int:
    """Tokens rounded up to whole KV blocks."""
    return -(-tokens // block_size) * block_size
