"""A load-test scenario: who sends what, when, against which simulated GPU, and the policy
fragments the two gateway targets run with. Decoded from YAML into msgspec Structs (unknown keys
are errors); every distribution draws from a ``random.Random`` the caller seeds, so one seed gives
one trace.

Times are wall-clock seconds from the start of the run; sizes are tokens.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

from gateway.sim.config import SimConfig

SYSTEM_MIN_TOKENS = 5  # a system message: 4 tokens of framing and at least one of text
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Tokens = Annotated[int, msgspec.Meta(ge=1)]


class _Spec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class _Dist(_Spec, tag_field="kind", frozen=True):
    pass


# --- request sizes --------------------------------------------------------------------------


class Fixed(_Dist, tag="fixed", kw_only=True, frozen=True):
    value: Tokens

    def draw(self, rng: random.Random) -> int:
        return self.value


class Uniform(_Dist, tag="uniform", kw_only=True, frozen=True):
    """Integers in [low, high], both ends included, equally likely."""

    low: Tokens
    high: Tokens

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"uniform: high ({self.high}) < low ({self.low})")

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class LogNormal(_Dist, tag="lognormal", kw_only=True, frozen=True):
    """exp(N(ln median, sigma)), rounded and clipped to [min, max]: the shape of real prompt and
    output lengths (most short, a few long)."""

    median: Positive
    sigma: Positive
    min: Tokens = 1
    max: Tokens

    def __post_init__(self) -> None:
        if not self.min <= self.median <= self.max:
            raise ValueError(f"lognormal: median {self.median} outside [{self.min}, {self.max}]")

    def draw(self, rng: random.Random) -> int:
        value = round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))
        return min(self.max, max(self.min, value))


class Pareto(_Dist, tag="pareto", kw_only=True, frozen=True):
    """Heavy tail: P(X > x) = (min / x) ** alpha for x >= min, clipped at max (long contexts)."""

    min: Tokens
    alpha: Positive
    max: Tokens

    def __post_init__(self) -> None:
        if self.max < self.min:
            raise ValueError(f"pareto: max ({self.max}) < min ({self.min})")

    def draw(self, rng: random.Random) -> int:
        # 1 - random() lies in (0, 1], so the power is finite.
        value = self.min / float((1.0 - rng.random()) ** (1.0 / self.alpha))
        return min(self.max, math.floor(value))


SimpleSize = Fixed | Uniform | LogNormal | Pareto


class Component(_Spec, kw_only=True, frozen=True):
    weight: Positive
    size: SimpleSize


class Mixture(_Dist, tag="mixture", kw_only=True, frozen=True):
    """Draws a component with probability weight / total weight, then a size from it."""

    components: Annotated[list[Component], msgspec.Meta(min_length=1)]

    def draw(self, rng: random.Random) -> int:
        weights = [c.weight for c in self.components]
        return rng.choices(self.components, weights=weights)[0].size.draw(rng)


Size = Fixed | Uniform | LogNormal | Pareto | Mixture


# --- arrivals -------------------------------------------------------------------------------


class _Arrivals(_Dist, kw_only=True, frozen=True):
    """An arrival process active on [start_s, end_s) (end_s defaults to the scenario duration)."""

    start_s: NonNegative = 0.0
    end_s: NonNegative | None = None

    def window(self, duration_s: float) -> tuple[float, float]:
        end = duration_s if self.end_s is None else min(self.end_s, duration_s)
        return self.start_s, max(self.start_s, end)


class Poisson(_Arrivals, tag="poisson", kw_only=True, frozen=True):
    rate_per_s: Positive

    def times(self, rng: random.Random, duration_s: float) -> list[float]:
        start, end = self.window(duration_s)
        out: list[float] = []
        t = start + rng.expovariate(self.rate_per_s)
        while t < end:
            out.append(t)
            t += rng.expovariate(self.rate_per_s)
        return out

    def expected_count(self, duration_s: float) -> float:
        start, end = self.window(duration_s)
        return self.rate_per_s * (end - start)


class Constant(_Arrivals, tag="constant", kw_only=True, frozen=True):
    """Evenly spaced arrivals, 1 / rate_per_s apart (no randomness)."""

    rate_per_s: Positive

    def times(self, rng: random.Random, duration_s: float) -> list[float]:
        start, end = self.window(duration_s)
        count = math.ceil((end - start) * self.rate_per_s)
        return [t for i in range(count) if (t := start + i / self.rate_per_s) < end]

    def expected_count(self, duration_s: float) -> float:
        start, end = self.window(duration_s)
        return self.rate_per_s * (end - start)


class Ramp(_Arrivals, tag="ramp", kw_only=True, frozen=True):
    """Poisson arrivals whose rate moves linearly from from_rate_per_s to to_rate_per_s."""

    from_rate_per_s: NonNegative
    to_rate_per_s: NonNegative

    def rate_at(self, t: float, duration_s: float) -> float:
        start, end = self.window(duration_s)
        share = 0.0 if end <= start else (t - start) / (end - start)
        return self.from_rate_per_s + (self.to_rate_per_s - self.from_rate_per_s) * share

    def times(self, rng: random.Random, duration_s: float) -> list[float]:
        # Thinning: candidates at the peak rate, each kept with probability rate(t) / peak.
        start, end = self.window(duration_s)
        peak = max(self.from_rate_per_s, self.to_rate_per_s)
        if peak <= 0.0:
            return []
        candidates = Poisson(rate_per_s=peak, start_s=start, end_s=end).times(rng, duration_s)
        return [t for t in candidates if rng.random() * peak < self.rate_at(t, duration_s)]

    def expected_count(self, duration_s: float) -> float:
        start, end = self.window(duration_s)
        return (self.from_rate_per_s + self.to_rate_per_s) / 2.0 * (end - start)


class OnOff(_Arrivals, tag="on_off", kw_only=True, frozen=True):
    """Poisson at rate_per_s during on_s, silence during off_s, repeating from start_s."""

    rate_per_s: Positive
    on_s: Positive
    off_s: NonNegative

    def on_time(self, duration_s: float) -> float:
        start, end = self.window(duration_s)
        period = self.on_s + self.off_s
        full, rest = divmod(end - start, period)
        return full * self.on_s + min(rest, self.on_s)

    def times(self, rng: random.Random, duration_s: float) -> list[float]:
        start, end = self.window(duration_s)
        period = self.on_s + self.off_s
        out: list[float] = []
        begin = start
        while begin < end:
            on = Poisson(rate_per_s=self.rate_per_s, start_s=begin, end_s=begin + self.on_s)
            out.extend(on.times(rng, end))
            begin += period
        return out

    def expected_count(self, duration_s: float) -> float:
        return self.rate_per_s * self.on_time(duration_s)


class Bursts(_Arrivals, tag="bursts", kw_only=True, frozen=True):
    """Every every_s seconds, size requests spread uniformly over the next spread_s seconds."""

    every_s: Positive
    size: Tokens
    spread_s: NonNegative = 0.0

    def burst_starts(self, duration_s: float) -> list[float]:
        start, end = self.window(duration_s)
        return [start + i * self.every_s for i in range(math.ceil((end - start) / self.every_s))]

    def times(self, rng: random.Random, duration_s: float) -> list[float]:
        _, end = self.window(duration_s)
        out: list[float] = []
        for begin in self.burst_starts(duration_s):
            drawn = (begin + rng.random() * self.spread_s for _ in range(self.size))
            out.extend(t for t in drawn if t < end)
        return sorted(out)

    def expected_count(self, duration_s: float) -> float:
        _, end = self.window(duration_s)
        total = 0.0
        for begin in self.burst_starts(duration_s):
            inside = 1.0 if self.spread_s == 0 else min(1.0, (end - begin) / self.spread_s)
            total += self.size * inside
        return total


Arrivals = Poisson | Constant | Ramp | OnOff | Bursts


# --- tenants and the scenario ---------------------------------------------------------------


class Slo(_Spec, kw_only=True, frozen=True):
    """A request meets its SLO when it succeeds, its end-to-end latency is at most latency_s and,
    when streamed, its time to first token is at most ttft_s (both from its scheduled time)."""

    ttft_s: Positive
    latency_s: Positive


class RetrySpec(_Spec, kw_only=True, frozen=True):
    """Client retries in the manner of the OpenAI SDKs: 408, 409, 429 and 5xx are retried unless
    ``x-should-retry: false``; the wait is ``retry-after-ms`` / ``Retry-After`` when given and at
    most max_wait_s (longer: give up), else backoff_s doubling per attempt."""

    max_retries: Annotated[int, msgspec.Meta(ge=0)] = 0
    honour_retry_after: bool = True
    max_wait_s: Positive = 60.0
    backoff_s: Positive = 0.5


class TenantSpec(_Spec, kw_only=True, frozen=True):
    """One client population. Shared prefixes (for a backend with ``prefix_caching``): with
    ``shared_prefix_tokens: N`` every request of the tenant opens with a system message of N
    tokens (its message framing included, so N >= 5) whose text is the same for all of them,
    then its own user message of ``prompt_tokens`` (which then counts the unique part only: a
    request's prompt is N + that). ``shared_prefixes: K`` gives the tenant K different system
    prompts of that length, each request taking one uniformly (several apps behind one key)."""

    key: Annotated[str, msgspec.Meta(min_length=8)]  # plaintext API key the client sends
    priority: Literal["critical", "standard", "sheddable"] = "standard"
    weight: Positive = 1.0
    arrivals: Annotated[list[Arrivals], msgspec.Meta(min_length=1)]
    prompt_tokens: Size
    output_tokens: Size  # what the backend really generates (sim_output_tokens)
    max_tokens: Size  # what the client reserves; the real output is capped by it
    stream_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    slo: Slo
    retry: RetrySpec = RetrySpec()
    timeout_s: Positive | None = None  # client gives up; also sent as x-request-timeout
    shared_prefix_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    shared_prefixes: Annotated[int, msgspec.Meta(ge=1)] = 1

    def __post_init__(self) -> None:
        if 0 < self.shared_prefix_tokens < SYSTEM_MIN_TOKENS:
            raise ValueError(
                f"shared_prefix_tokens must be 0 or at least {SYSTEM_MIN_TOKENS} (a system "
                f"message's framing is 4 tokens), got {self.shared_prefix_tokens}"
            )


PolicyMap = dict[str, object]


class PolicyFragment(_Spec, kw_only=True, frozen=True):
    """Pieces of a gateway policy (DESIGN.md §7 shape), deep-merged by the harness into the
    policy it writes: ``model`` into ``models.<model>``, ``backend`` into its one backend (the
    harness fills ``url``), ``tenants.<name>`` into each tenant (the harness fills ``keys``,
    ``priority`` and ``weight``), ``admission`` into ``admission``, ``top`` into the root."""

    model: PolicyMap = {}
    backend: PolicyMap = {}
    tenants: dict[str, PolicyMap] = {}
    admission: PolicyMap = {}
    top: PolicyMap = {}


class GatewaySpec(_Spec, kw_only=True, frozen=True):
    common: PolicyFragment = PolicyFragment()
    count_limited: PolicyFragment = PolicyFragment()
    kvgate: PolicyFragment = PolicyFragment()

    def __post_init__(self) -> None:
        for section in (self.common, self.count_limited):
            limits = [section.model.get("limits", [])]
            limits += [t.get("limits", []) for t in section.tenants.values()]
            for group in limits:
                if not isinstance(group, list):
                    raise ValueError("limits must be a list")
                for limit in group:
                    if not isinstance(limit, dict) or limit.get("unit") != "requests":
                        raise ValueError(
                            "the count-limited target (and common) may only use requests limits"
                        )


class LimiterSpec(_Spec, kw_only=True, frozen=True):
    """The concurrency-limiter target: ``limit`` requests in flight per backend, or, when a
    comparison sweeps, each of ``sweep`` tried on the same trace and the best one reported."""

    limit: Annotated[int, msgspec.Meta(ge=1)] = 16
    sweep: list[Annotated[int, msgspec.Meta(ge=1)]] = []
    max_wait_s: Positive | None = None


class Scenario(_Spec, kw_only=True, frozen=True):
    name: str
    description: str
    seed: int = 0
    duration_s: Positive  # arrivals are drawn on [0, duration_s)
    drain_timeout_s: NonNegative = 10.0  # after duration_s, wait this long for answers, then cut
    max_requests: Annotated[int, msgspec.Meta(ge=1, le=20000)] = 2000
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1024
    backend: SimConfig = SimConfig()
    backend_wait: Literal["ready", "listening"] = "ready"  # listening: traffic meets a cold start
    restart_at_s: NonNegative | None = None  # the harness POSTs /admin/restart at this time
    tenants: Annotated[dict[str, TenantSpec], msgspec.Meta(min_length=1)]
    gateway: GatewaySpec = GatewaySpec()
    limiter: LimiterSpec = LimiterSpec()

    def __post_init__(self) -> None:
        unknown = {
            name
            for fragment in (self.gateway.common, self.gateway.count_limited, self.gateway.kvgate)
            for name in fragment.tenants
        } - set(self.tenants)
        if unknown:
            raise ValueError(f"gateway fragments name unknown tenants: {sorted(unknown)}")
        if self.restart_at_s is not None and self.restart_at_s >= self.duration_s:
            raise ValueError("restart_at_s must fall inside duration_s")

    @property
    def model(self) -> str:
        return self.backend.model

    def with_seed(self, seed: int) -> Scenario:
        return msgspec.structs.replace(self, seed=seed)


class ScenarioError(Exception):
    """A scenario file that cannot be read or decoded; the message names the file and path."""


def load_scenario(path: Path) -> Scenario:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return msgspec.convert(data, Scenario)
    except (OSError, yaml.YAMLError, msgspec.ValidationError) as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
