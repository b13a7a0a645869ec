"""Adaptive concurrency limit for a backend that reports no memory signal and has no configured
``kv_capacity``: the gateway learns how many requests it can hold from their latency.

The algorithm is AIMD with a latency gradient (after Netflix concurrency-limits):
- a *drop* (a timeout, a 5xx, an OOM or a rise of the backend's preemption counter) multiplies
  the limit by ``backoff`` (at most once per ``cooldown_s``, so one burst counts once);
- a time-to-first-token sample whose short-term average exceeds ``tolerance`` * the long-term
  baseline is a drop too: queueing inside the backend has started;
- otherwise, when the backend was at least half used (``inflight * 2 >= limit``), the limit grows
  by one per sample, additively.
The limit stays in [min_limit, max_limit]. It starts at ``max_concurrency`` when the policy sets
one, else at ``DEFAULT_INITIAL_LIMIT``.
"""

from __future__ import annotations

DEFAULT_INITIAL_LIMIT = 32
DEFAULT_MAX_LIMIT = 1024


class AdaptiveLimit:
    """A concurrency limit (requests in flight) learned from samples. Pure: time is an argument."""

    __slots__ = (
        "_baseline_s",
        "_last_drop",
        "_recent_s",
        "backoff",
        "cooldown_s",
        "limit",
        "max_limit",
        "min_limit",
        "tolerance",
    )

    def __init__(
        self,
        *,
        initial: int | None = None,
        max_limit: int | None = None,
        min_limit: int = 1,
        backoff: float = 0.9,
        tolerance: float = 2.0,
        cooldown_s: float = 1.0,
    ) -> None:
        self.max_limit = float(max_limit if max_limit is not None else DEFAULT_MAX_LIMIT)
        self.min_limit = float(min_limit)
        start = initial if initial is not None else DEFAULT_INITIAL_LIMIT
        self.limit = min(self.max_limit, max(self.min_limit, float(start)))
        self.backoff = backoff
        self.tolerance = tolerance
        self.cooldown_s = cooldown_s
        self._baseline_s: float | None = None
        self._recent_s: float | None = None
        self._last_drop = float("-inf")

    @property
    def value(self) -> int:
        """Whole requests that may be in flight."""
        return int(self.limit)

    def on_sample(self, *, ttft_s: float | None, inflight: int, dropped: bool, now: float) -> None:
        """Feed one finished request: its time to first token (None if unknown), how many
        requests were in flight when it finished, and whether it failed for overload."""
        if dropped:
            self.on_drop(now)
            return
        if ttft_s is not None:
            self._track(ttft_s)
            base, recent = self._baseline_s, self._recent_s
            if base is not None and recent is not None and recent > self.tolerance * base:
                self.on_drop(now)
                return
        if inflight * 2 >= self.limit:
            self.limit = min(self.max_limit, self.limit + 1.0)

    def on_drop(self, now: float) -> None:
        if now - self._last_drop < self.cooldown_s:
            return
        self._last_drop = now
        self.limit = max(self.min_limit, self.limit * self.backoff)
        # after a cut the short-term view starts over, or one slow period would cut repeatedly
        self._recent_s = self._baseline_s

    def _track(self, ttft_s: float) -> None:
        if self._baseline_s is None or self._recent_s is None:
            self._baseline_s = self._recent_s = ttft_s
            return
        self._recent_s += 0.2 * (ttft_s - self._recent_s)
        # the baseline follows improvements at once and degradations only slowly
        if ttft_s < self._baseline_s:
            self._baseline_s = ttft_s
        else:
            self._baseline_s += 0.01 * (ttft_s - self._baseline_s)
