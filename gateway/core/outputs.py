"""Online estimate of output lengths, for "likely" KV reservations on paged backends.

For each (model, tenant) the last ``window`` output lengths (tokens) are kept; the reservation
uses their ``quantile``. A tenant with fewer than ``min_samples`` falls back to the model's pooled
samples, and a model with too few falls back to the request's ``max_tokens``. The estimate is
never more than ``max_tokens``: the backend stops there anyway.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

_ANY_TENANT = ""


class _Samples:
    """A sliding window kept twice: in arrival order (to evict the oldest) and sorted (so a
    quantile is one index). Insertion and eviction are a bisect and a memmove of at most
    ``window`` ints: microseconds, on every finished request."""

    __slots__ = ("_ordered", "_values")

    def __init__(self, window: int) -> None:
        self._values: deque[int] = deque(maxlen=window)
        self._ordered: list[int] = []

    def add(self, value: int) -> None:
        if len(self._values) == self._values.maxlen:
            del self._ordered[bisect.bisect_left(self._ordered, self._values[0])]
        self._values.append(value)
        bisect.insort(self._ordered, value)

    def __len__(self) -> int:
        return len(self._values)

    def quantile(self, q: float) -> int:
        """Nearest-rank quantile: the smallest sample with at least ``q`` of samples ≤ it."""
        return self._ordered[max(1, math.ceil(q * len(self._ordered))) - 1]


class OutputLengths:
    """Recent output lengths per (model, tenant) and per model. Memory is bounded by
    ``window`` samples per key; keys are bounded by the policy's models and tenants."""

    __slots__ = ("_samples", "min_samples", "quantile", "window")

    def __init__(self, *, quantile: float = 0.9, window: int = 512, min_samples: int = 20) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"output quantile must be in (0, 1], got {quantile}")
        self.quantile = quantile
        self.window = window
        self.min_samples = min_samples
        self._samples: dict[tuple[str, str], _Samples] = {}

    def observe(self, model: str, tenant: str, output_tokens: int) -> None:
        if output_tokens < 0:
            return
        for key in ((model, tenant), (model, _ANY_TENANT)):
            samples = self._samples.get(key)
            if samples is None:
                samples = self._samples[key] = _Samples(self.window)
            samples.add(output_tokens)

    def likely(self, model: str, tenant: str, max_tokens: int) -> int:
        """Output tokens to reserve for a request allowed ``max_tokens``."""
        for key in ((model, tenant), (model, _ANY_TENANT)):
            samples = self._samples.get(key)
            if samples is not None and len(samples) >= self.min_samples:
                return min(max_tokens, samples.quantile(self.quantile))
        return max_tokens

    def count(self, model: str, tenant: str) -> int:
        samples = self._samples.get((model, tenant))
        return 0 if samples is None else len(samples)
