"""How much of a warming backend's capacity may be used, learned from how it serves. Pure.

A fresh server is slow at first, not small: its memory is all there, but its first steps are
slow (graphs captured, caches and kernels cold). A ramp by the clock either floods it (too
fast for a slow start) or leaves it idle (too slow for a quick one). This ramp moves with what
the backend shows it can serve, in the manner of TCP's slow start and AIMD:

- it starts at ``floor`` (the policy's ``warmup.floor``) and stays there until the backend is
  seen answering: a stream's first token as it comes (``answering``), a whole answer, or,
  after a restart, the warm reference. Until then a slow server and a flooded one look
  alike, and a small batch answers soonest, which also gives the queue its first drain rate
  to predict waits by;
- then each fresh scrape in which the backend *kept up* while the gateway used at least half of the
  allowance doubles it (slow start); after a cut it grows additively by ``step`` instead;
- the backend did *not* keep up when its scrape shows a queue of its own or a rise of its
  preemption counter, when a request failed there (5xx, timeout, OOM), or when a time to first
  token is above ``tolerance`` times the one it gives when warm: the allowance is multiplied by
  ``backoff`` (at most once per ``cooldown_s``, so one burst counts once);
- warming ends when the allowance reaches 1, or after ``warmup_s`` at the latest.

The warm reference is the time to first token learned while the backend was ready (an EWMA);
it outlives restarts, which is when it matters. On a first load there is none yet: the first
answer measures the backend, and then only its own reports judge it.
"""

from __future__ import annotations

from dataclasses import dataclass

_TTFT_EWMA_ALPHA = 0.1


@dataclass(frozen=True, slots=True)
class RampConfig:
    """Defaults: doubling per good scrape reaches full from a 10 % floor in four scrapes (under a
    second at a 200 ms probe interval); a cut keeps 70 %; a TTFT three times the warm one is
    slow beyond a fresh server's usual first-step cost; additive growth after a cut refills the
    allowance in ten good scrapes."""

    floor: float = 0.1
    backoff: float = 0.7
    step: float = 0.1
    tolerance: float = 3.0
    cooldown_s: float = 1.0


class WarmupRamp:
    """The allowance (a share of capacity in [floor, 1]) of one warming backend, and the warm
    time to first token it is judged against. Every method takes ``now``."""

    __slots__ = ("_cut", "_last_cut", "_measured", "allowance", "config", "warm_ttft_s")

    def __init__(self, config: RampConfig) -> None:
        if not 0.0 <= config.floor <= 1.0:
            raise ValueError(f"warm-up floor must be in [0, 1], got {config.floor}")
        self.config = config
        self.allowance = 1.0
        self.warm_ttft_s: float | None = None
        self._cut = False
        self._last_cut = float("-inf")
        self._measured = False

    def retune(self, config: RampConfig) -> None:
        self.config = config
        self.allowance = max(self.allowance, config.floor)

    def restart(self) -> None:
        """Warming begins: back to the floor, in slow start. Growth needs a measure of the
        backend's speed: the warm reference (a restart), else its first request's answer."""
        self.allowance = self.config.floor
        self._cut = False
        self._last_cut = float("-inf")
        self._measured = self.warm_ttft_s is not None

    @property
    def full(self) -> bool:
        return self.allowance >= 1.0

    def kept_up(self, *, used: float) -> None:
        """A fresh scrape showed the backend serving what it was given; ``used`` is the share
        of the allowance the gateway's requests held there. Growth is earned by use only."""
        if used < 0.5 or not self._measured:
            return
        if self._cut:
            grown = self.allowance + self.config.step
        else:
            grown = self.allowance * 2.0 if self.allowance > 0 else self.config.step
        self.allowance = min(1.0, grown)

    def fell_behind(self, now: float) -> None:
        """The backend showed it could not serve what it was given."""
        if now - self._last_cut < self.config.cooldown_s:
            return
        self._last_cut = now
        self._cut = True
        self.allowance = max(self.config.floor, self.allowance * self.config.backoff)

    def answering(self) -> None:
        """A first token came back while its request still runs: the backend serves, at a
        speed its requests' ends will judge. Heard as it comes, a first load's ramp may grow
        before any request ends (on cold_start it waited 1.4 s at the floor for one). The
        judgement itself waits for the end, as before: a time to first token heard at once
        is inflated by the prefill of the very burst the ramp just let in, and judged then it
        cuts a backend that is not slow."""
        self._measured = True

    def first_token(self, ttft_s: float, *, warming: bool, now: float) -> None:
        """A request's time to first token: learned as the warm reference when the backend is
        ready, judged against it while warming."""
        if not warming:
            ref = self.warm_ttft_s
            self.warm_ttft_s = ttft_s if ref is None else ref + _TTFT_EWMA_ALPHA * (ttft_s - ref)
            return
        self._measured = True
        ref = self.warm_ttft_s
        if ref is not None and ttft_s > self.config.tolerance * ref:
            self.fell_behind(now)
