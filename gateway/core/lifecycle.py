"""The life cycle of one backend: loading → warming → ready, ejected on failures. Pure.

- ``LOADING``: health is not OK (connection refused, 503, llama.cpp "Loading model"), or the
  proxy found nothing listening: no capacity. The first load is predicted from the policy's
  ``expected_load``; each load the probes see from start to end is measured, and their EWMA
  predicts the next (Retry-After, and "will it be up before this request's deadline?"). The
  last prediction's error is kept for the admin view.
- ``WARMING``: the capacity factor is the allowance of ``gateway.core.warmup``: from ``floor``
  it grows as the backend shows it serves what it is given (its scrapes, its requests' failures
  and times to first token) and is cut when it does not; ``READY`` when it reaches 1, or after
  ``warmup_s`` at the latest. A backend whose very first probe is healthy was already serving before
  the gateway looked, so it starts ``READY``: a gateway restart must not throttle a warm fleet.
- ``EJECTED``: ``eject_failures`` consecutive failures of a backend that answers (5xx, timeouts
  reported by the proxy, failed probes) remove it for ``cooldown_s``; then it warms again (or
  loads, if its health is not OK by then). A backend that goes down meanwhile (refused, or 503
  loading) and answers again is a new process: it loads and warms at once, without waiting out
  the cool-down.
"""

from __future__ import annotations

import enum

from gateway.core.types import Phase
from gateway.core.warmup import RampConfig, WarmupRamp

# Members read on every request, bound once: on Python 3.11 a read off the class goes through
# the enum metaclass's ``__getattr__`` hook (about 140 ns a read; 3.12 dropped it).
_WARMING = Phase.WARMING
_READY = Phase.READY
_SERVING = (_WARMING, _READY)
_EJECTED = Phase.EJECTED


class Health(enum.StrEnum):
    """What one health probe saw."""

    OK = "ok"
    LOADING = "loading"  # refused, 503, or a "Loading model" body: on its way up
    FAILED = "failed"  # any other error or timeout: counts towards ejection


_LOAD_EWMA_ALPHA = 0.5
_OVERDUE_SHARE = 0.25  # an overdue load is predicted to need another quarter of its usual time


class Lifecycle:
    """The phase of one backend, driven by probes, proxy reports and time.

    Invariants: ``capacity_factor`` is 0 in LOADING and EJECTED, in [floor, 1] while WARMING and
    1 when READY; phases change only in ``observe_health``, ``went_down``, ``record_failure``,
    ``kept_up`` and ``advance``.
    """

    __slots__ = (
        "_cooldown_s",
        "_eject_failures",
        "_health_ok",
        "_load_seen",
        "_load_started",
        "_predicted_load_s",
        "_probed",
        "_warmup_s",
        "ejected_until",
        "expected_load_s",
        "failures",
        "last_load_error_s",
        "load_estimate_s",
        "phase",
        "ramp",
        "since",
    )

    def __init__(
        self,
        *,
        warmup_s: float,
        floor: float,
        eject_failures: int,
        cooldown_s: float,
        expected_load_s: float,
        now: float,
    ) -> None:
        self.ramp = WarmupRamp(RampConfig(floor=floor))
        self._warmup_s = warmup_s
        self._eject_failures = eject_failures
        self._cooldown_s = cooldown_s
        self.expected_load_s = expected_load_s
        self.phase = Phase.LOADING
        self.since = now
        self._load_started = now
        self._load_seen = False  # the probes saw this load begin (or the backend not up yet)
        self._predicted_load_s = expected_load_s
        self._probed = False
        self._health_ok = False
        self.failures = 0
        self.ejected_until = 0.0
        self.load_estimate_s: float | None = None  # learned from observed loads
        self.last_load_error_s: float | None = None  # predicted minus real, of the last load

    def retune(
        self,
        *,
        warmup_s: float,
        floor: float,
        eject_failures: int,
        cooldown_s: float,
        expected_load_s: float,
    ) -> None:
        """Adopt new policy settings; the phase and what was learned stay."""
        self._warmup_s = warmup_s
        self.ramp.retune(RampConfig(floor=floor))
        self._eject_failures = eject_failures
        self._cooldown_s = cooldown_s
        self.expected_load_s = expected_load_s

    def observe_health(self, health: Health, now: float) -> None:
        first = not self._probed
        self._probed = True
        if health is Health.FAILED:
            self._health_ok = False
            self.record_failure(now)
            return
        self._health_ok = health is Health.OK
        if health is Health.LOADING:
            self._load_seen = True
            if self.phase is not Phase.LOADING:
                self._start_loading(now)
            return
        if self.phase is Phase.EJECTED:
            return  # it answers but failed: the cool-down runs its course (``advance``)
        if self.phase is Phase.LOADING:
            if first:
                self._enter(Phase.READY, now)
                return
            if self._load_seen:
                self._learn_load_time(now - self._load_started)
            self._enter_warming(now)

    def went_down(self, now: float) -> None:
        """The proxy found nothing listening (connection refused): the process is gone or
        restarting, so no request goes there until a probe finds it up again."""
        self._health_ok = False
        if self.phase is not Phase.LOADING:
            self._start_loading(now)

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.phase is Phase.WARMING:
            self.ramp.fell_behind(now)
        serving = self.phase in (Phase.WARMING, Phase.READY)
        if serving and self.failures >= self._eject_failures:
            self._enter(Phase.EJECTED, now)
            self.ejected_until = now + self._cooldown_s

    def record_success(self) -> None:
        self.failures = 0

    def kept_up(self, *, used: float, now: float) -> None:
        """A fresh scrape showed the backend serving all it was given (no queue of its own, no
        preemption); ``used``: the share of its warming capacity the gateway's requests hold."""
        if self.phase is Phase.WARMING:
            self.ramp.kept_up(used=used)
            self.advance(now)

    def fell_behind(self, now: float) -> None:
        """The backend queued or preempted what it was given: a warming one gets less."""
        if self.phase is Phase.WARMING:
            self.ramp.fell_behind(now)

    def answering(self) -> None:
        """A first token of a request here came back, its request still running."""
        if self.phase is Phase.WARMING:
            self.ramp.answering()

    def first_token(self, ttft_s: float, now: float) -> None:
        """A request here had its first token after ``ttft_s``: the warm reference when ready,
        a judgement of a warming backend's speed otherwise."""
        if self.phase in _SERVING:
            self.ramp.first_token(ttft_s, warming=self.phase is _WARMING, now=now)

    def advance(self, now: float) -> None:
        if self.phase is _WARMING and (self.ramp.full or now >= self.since + self._warmup_s):
            self._enter(_READY, now)
        elif self.phase is _EJECTED and now >= self.ejected_until:
            self.failures = 0
            if self._health_ok:
                self._enter_warming(now)
            else:
                self._start_loading(now)

    def capacity_factor(self, now: float) -> float:
        self.advance(now)
        if self.phase is _READY:
            return 1.0
        if self.phase is _WARMING:
            return self.ramp.allowance
        return 0.0

    def serving(self, now: float) -> bool:
        """May receive traffic now (warming or ready)."""
        self.advance(now)
        return self.phase in _SERVING

    def predicted_ready_at(self, now: float) -> float:
        """When this backend is expected to take traffic again: now if it does, the end of an
        ejection, or the predicted end of its load (an overdue load is expected to need a
        quarter of its usual time more)."""
        if self.serving(now):
            return now
        if self.phase is Phase.EJECTED:
            return self.ejected_until
        expected_end = self._load_started + self.predicted_load_s
        if expected_end > now:
            return expected_end
        return now + _OVERDUE_SHARE * self.predicted_load_s

    def load_overdue(self, now: float) -> bool:
        return self.phase is Phase.LOADING and now > self._load_started + self.predicted_load_s

    @property
    def predicted_load_s(self) -> float:
        """How long a load is expected to take: learned, else the policy's expectation."""
        return self.expected_load_s if self.load_estimate_s is None else self.load_estimate_s

    def next_change_at(self, now: float) -> float | None:
        """The next moment time alone changes this backend's capacity (for the driver's timer)."""
        if self.phase is Phase.WARMING:
            return self.since + self._warmup_s  # the ramp itself moves with probes and requests
        if self.phase is Phase.EJECTED:
            return self.ejected_until
        return None

    def _start_loading(self, now: float) -> None:
        self._enter(Phase.LOADING, now)
        self._load_started = now
        self._load_seen = False
        self._predicted_load_s = self.predicted_load_s

    def _learn_load_time(self, seconds: float) -> None:
        self.last_load_error_s = self._predicted_load_s - seconds
        if self.load_estimate_s is None:
            self.load_estimate_s = seconds
        else:
            self.load_estimate_s += _LOAD_EWMA_ALPHA * (seconds - self.load_estimate_s)

    def _enter_warming(self, now: float) -> None:
        if self._warmup_s <= 0:
            self._enter(Phase.READY, now)
        else:
            self.ramp.restart()
            self._enter(Phase.WARMING, now)

    def _enter(self, phase: Phase, now: float) -> None:
        self.phase = phase
        self.since = now
