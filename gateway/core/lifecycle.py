"""The life cycle of one backend: loading → warming → ready, ejected on failures. Pure.

- ``LOADING``: health is not OK (connection refused, 503, llama.cpp "Loading model"): no capacity.
  The time a load takes is measured and its EWMA predicts the next one (Retry-After, and "will
  it be up before this request's deadline?").
- ``WARMING``: capacity factor ramps linearly from ``floor`` to 1 over ``warmup_s`` (Envoy slow
  start), then ``READY``. A backend whose very first probe is healthy was already serving before
  the gateway looked, so it starts ``READY``: a gateway restart must not throttle a warm fleet.
- ``EJECTED``: ``eject_failures`` consecutive failures (connect errors or 5xx reported by the
  proxy, failed probes) remove it for ``cooldown_s``; then it warms again (or loads, if its
  health is not OK by then).
"""

from __future__ import annotations

import enum

from gateway.core.types import Phase


class Health(enum.StrEnum):
    """What one health probe saw."""

    OK = "ok"
    LOADING = "loading"  # refused, 503, or a "Loading model" body: on its way up
    FAILED = "failed"  # any other error or timeout: counts towards ejection


_LOAD_EWMA_ALPHA = 0.5
_RAMP_STEPS = 20
_OVERDUE_SHARE = 0.25  # an overdue load is predicted to need another quarter of its usual time


class Lifecycle:
    """The phase of one backend, driven by probes, proxy reports and time.

    Invariants: ``capacity_factor`` is 0 in LOADING and EJECTED, in [floor, 1] while WARMING and
    1 when READY; phases change only in ``observe_health``, ``record_failure`` and ``advance``.
    """

    __slots__ = (
        "_cooldown_s",
        "_eject_failures",
        "_floor",
        "_health_ok",
        "_load_started",
        "_probed",
        "_warmup_s",
        "ejected_until",
        "failures",
        "load_estimate_s",
        "phase",
        "since",
    )

    def __init__(
        self, *, warmup_s: float, floor: float, eject_failures: int, cooldown_s: float, now: float
    ) -> None:
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"warm-up floor must be in [0, 1], got {floor}")
        self._warmup_s = warmup_s
        self._floor = floor
        self._eject_failures = eject_failures
        self._cooldown_s = cooldown_s
        self.phase = Phase.LOADING
        self.since = now
        self._load_started = now
        self._probed = False
        self._health_ok = False
        self.failures = 0
        self.ejected_until = 0.0
        self.load_estimate_s: float | None = None

    def retune(
        self, *, warmup_s: float, floor: float, eject_failures: int, cooldown_s: float
    ) -> None:
        """Adopt new policy settings; the phase and what was learned stay."""
        self._warmup_s = warmup_s
        self._floor = floor
        self._eject_failures = eject_failures
        self._cooldown_s = cooldown_s

    def observe_health(self, health: Health, now: float) -> None:
        first = not self._probed
        self._probed = True
        if health is Health.FAILED:
            self._health_ok = False
            self.record_failure(now)
            return
        self._health_ok = health is Health.OK
        if self.phase is Phase.EJECTED:
            return  # the cool-down runs its course; ``advance`` picks warming or loading
        if health is Health.LOADING:
            if self.phase is not Phase.LOADING:
                self._enter(Phase.LOADING, now)
                self._load_started = now
            return
        if self.phase is Phase.LOADING:
            if first:
                self._enter(Phase.READY, now)
                return
            self._learn_load_time(now - self._load_started)
            self._enter_warming(now)

    def record_failure(self, now: float) -> None:
        self.failures += 1
        serving = self.phase in (Phase.WARMING, Phase.READY)
        if serving and self.failures >= self._eject_failures:
            self._enter(Phase.EJECTED, now)
            self.ejected_until = now + self._cooldown_s

    def record_success(self) -> None:
        self.failures = 0

    def advance(self, now: float) -> None:
        if self.phase is Phase.WARMING and now >= self.since + self._warmup_s:
            self._enter(Phase.READY, now)
        elif self.phase is Phase.EJECTED and now >= self.ejected_until:
            self.failures = 0
            if self._health_ok:
                self._enter_warming(now)
            else:
                self._enter(Phase.LOADING, now)
                self._load_started = now

    def capacity_factor(self, now: float) -> float:
        self.advance(now)
        if self.phase is Phase.READY:
            return 1.0
        if self.phase is Phase.WARMING:
            progress = min(1.0, max(0.0, (now - self.since) / self._warmup_s))
            return self._floor + (1.0 - self._floor) * progress
        return 0.0

    @property
    def serving(self) -> bool:
        """May receive traffic (warming or ready)."""
        return self.phase in (Phase.WARMING, Phase.READY)

    def predicted_ready_at(self, now: float) -> float | None:
        """When this backend is expected to take traffic again; ``None`` when unknown (a load
        of unknown length: no load has been observed yet)."""
        self.advance(now)
        if self.serving:
            return now
        if self.phase is Phase.EJECTED:
            return self.ejected_until
        if self.load_estimate_s is None:
            return None
        expected_end = self._load_started + self.load_estimate_s
        if expected_end > now:
            return expected_end
        return now + _OVERDUE_SHARE * self.load_estimate_s

    def next_change_at(self, now: float) -> float | None:
        """The next moment time alone changes this backend's capacity (for the driver's timer)."""
        if self.phase is Phase.WARMING:
            # the ramp is continuous; re-evaluating it in 20 steps keeps the driver's timer calm
            return min(self.since + self._warmup_s, now + self._warmup_s / _RAMP_STEPS)
        if self.phase is Phase.EJECTED:
            return self.ejected_until
        return None

    def _learn_load_time(self, seconds: float) -> None:
        if self.load_estimate_s is None:
            self.load_estimate_s = seconds
        else:
            self.load_estimate_s += _LOAD_EWMA_ALPHA * (seconds - self.load_estimate_s)

    def _enter_warming(self, now: float) -> None:
        if self._warmup_s <= 0:
            self._enter(Phase.READY, now)
        else:
            self._enter(Phase.WARMING, now)

    def _enter(self, phase: Phase, now: float) -> None:
        self.phase = phase
        self.since = now
