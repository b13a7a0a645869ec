"""Human units in policies: sizes ("18GiB"), durations ("30s"), rates ("200k/min"), shares ("10%").

Each parser raises ``ValueError`` with a message that says what was expected; msgspec turns it
into a validation error at the field's path when called from a Struct's ``__post_init__``.
"""

from __future__ import annotations

import re

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


def parse_size(value: str | int) -> int:
    """Bytes from ``8MiB``, ``18GiB``, ``500MB`` or a plain integer."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size >= 0, got {value}")
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size like '8MiB' or '18GiB', got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: str | float) -> float:
    """Seconds from ``30s``, ``100ms``, ``5m``, ``1h`` or a plain number of seconds."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a duration >= 0, got {value}")
        return float(value)
    match = _DURATION_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or (unit != "" and unit not in _DURATION_UNITS):
        raise ValueError(f"expected a duration like '30s', '100ms' or '5m', got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS.get(unit or "s", 1.0)


def parse_amount(value: str | float) -> float:
    """A number with an optional magnitude: ``40``, ``300k``, ``1.5M``."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected an amount >= 0, got {value}")
        return float(value)
    match = _AMOUNT_RE.match(value)
    if match is None:
        raise ValueError(f"expected an amount like '40', '300k' or '1M', got {value!r}")
    return float(match.group(1)) * _MAGNITUDES[match.group(2).lower()]


def parse_rate(value: str) -> tuple[float, float]:
    """``(amount, period_s)`` from ``200/s``, ``200k/min``, ``1M/day``, ``50/2h``."""
    match = _RATE_RE.match(value)
    period = match.group(4).lower() if match else ""
    if match is None or period not in _PERIODS:
        raise ValueError(f"expected a rate like '20/s', '200k/min' or '1M/day', got {value!r}")
    amount = float(match.group(1)) * _MAGNITUDES[match.group(2).lower()]
    multiple = float(match.group(3)) if match.group(3) else 1.0
    if multiple <= 0:
        raise ValueError(f"expected a positive period in {value!r}")
    return amount, multiple * _PERIODS[period]


def parse_share(value: str | float) -> float:
    """A fraction in [0, 1] from ``10%`` or ``0.1``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"expected a share like '10%' or 0.1, got {value!r}") from None
    else:
        share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"expected a share between 0% and 100%, got {value!r}")
    return share
