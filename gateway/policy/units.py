"""Human units in policies: sizes ("18GiB"), durations ("30s"), rates ("200k/min"), shares ("10%").

Each parser raises ``ValueError`` with a message that says what was expected; msgspec turns it
into a validation error at the field's path when called from a Struct's ``__post_init__``.
Every result is finite and bounded: a NaN, an infinity or a 400-digit number is refused here (and
by the schema's numeric constraints), never handed to the buckets, where it would disable a limit
or a timeout.
"""

from __future__ import annotations

import functools
import math
import re

# Upper bounds, far above any real setting and far below where float arithmetic misbehaves.
MAX_SIZE_BYTES = 2**50  # 1 PiB
MAX_DURATION_S = 365 * 86400.0  # a year
MAX_AMOUNT = 1e15  # tokens, requests, prices, bursts
MAX_COUNT = 2**31 - 1  # layers, context, queue depth...
_EXCERPT_CHARS = 40

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_MAGNITUDES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-z]*)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-z]*)\s*$", re.IGNORECASE)
_RATE_RE = re.compile(rf"^\s*{_NUMBER}\s*([kmgb]?)\s*/\s*(\d*)\s*([a-z]+)\s*$", re.IGNORECASE)
_AMOUNT_RE = re.compile(rf"^\s*{_NUMBER}\s*([kmgb]?)\s*$", re.IGNORECASE)


def excerpt(value: object) -> str:
    """``repr(value)``, cut to a few dozen characters: an error message never echoes a huge
    value back (into a log line, on every reload attempt)."""
    text = repr(value)
    if len(text) <= _EXCERPT_CHARS:
        return text
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[: _EXCERPT_CHARS - 1]}… ({size} characters)"


@functools.lru_cache(maxsize=4096)  # a large policy repeats a few values many times
def parse_size(value: str | int) -> int:
    """Bytes from ``8MiB``, ``18GiB``, ``500MB`` or a plain integer, at most 1 PiB."""
    if isinstance(value, int):
        size = float(value) if value <= MAX_SIZE_BYTES else math.inf
    else:
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"expected a size like '8MiB' or '18GiB', got {excerpt(value)}")
        size = float(match.group(1)) * _SIZE_UNITS[unit]
    if not 0 <= size <= MAX_SIZE_BYTES:
        raise ValueError(f"expected a size between 0 and 1PiB, got {excerpt(value)}")
    return int(size)


@functools.lru_cache(maxsize=4096)
def parse_duration(value: str | float) -> float:
    """Seconds from ``30s``, ``100ms``, ``5m``, ``1h`` or a plain number of seconds, at most a
    year."""
    if isinstance(value, int | float):
        seconds = _finite(value)
    else:
        match = _DURATION_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or (unit != "" and unit not in _DURATION_UNITS):
            raise ValueError(
                f"expected a duration like '30s', '100ms' or '5m', got {excerpt(value)}"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS.get(unit or "s", 1.0)
    if not 0 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"expected a duration between 0s and 365d, got {excerpt(value)}")
    return seconds


@functools.lru_cache(maxsize=4096)
def parse_amount(value: str | float) -> float:
    """A number with an optional magnitude: ``40``, ``300k``, ``1.5M``; at most 1e15."""
    if isinstance(value, int | float):
        amount = _finite(value)
    else:
        match = _AMOUNT_RE.match(value)
        if match is None:
            raise ValueError(f"expected an amount like '40', '300k' or '1M', got {excerpt(value)}")
        amount = float(match.group(1)) * _MAGNITUDES[match.group(2).lower()]
    if not 0 <= amount <= MAX_AMOUNT:
        raise ValueError(f"expected an amount between 0 and 1e15, got {excerpt(value)}")
    return amount


@functools.lru_cache(maxsize=4096)
def parse_rate(value: str) -> tuple[float, float]:
    """``(amount, period_s)`` from ``200/s``, ``200k/min``, ``1M/day``, ``50/2h``."""
    match = _RATE_RE.match(value)
    period = match.group(4).lower() if match else ""
    if match is None or period not in _PERIODS:
        raise ValueError(
            f"expected a rate like '20/s', '200k/min' or '1M/day', got {excerpt(value)}"
        )
    amount = float(match.group(1)) * _MAGNITUDES[match.group(2).lower()]
    multiple = float(match.group(3)) if match.group(3) else 1.0
    period_s = multiple * _PERIODS[period]
    if not 0 < period_s <= MAX_DURATION_S:
        raise ValueError(f"expected a period between 1s and 365d in {excerpt(value)}")
    if not 0 <= amount <= MAX_AMOUNT:
        raise ValueError(f"expected an amount between 0 and 1e15 in {excerpt(value)}")
    return amount, period_s


@functools.lru_cache(maxsize=4096)
def parse_share(value: str | float) -> float:
    """A fraction in [0, 1] from ``10%`` or ``0.1``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"expected a share like '10%' or 0.1, got {excerpt(value)}") from None
    else:
        share = _finite(value)
    if not 0.0 <= share <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"expected a share between 0% and 100%, got {excerpt(value)}")
    return share


def _finite(value: float) -> float:
    """``value`` as a float; NaN and the infinities come back as NaN, which every range check
    refuses (a 400-digit integer is too large for a float)."""
    try:
        number = float(value)
    except OverflowError:
        return math.nan
    return number if math.isfinite(number) else math.nan
