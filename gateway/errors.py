"""The exception tree. Exceptions mean something broke; refusals are values (``Outcome``).

GatewayError
├── PolicyError(source, detail)     invalid policy (startup exits; a reload keeps the old one)
├── StoreError                      the limit store (Redis) is unreachable or failed
└── UpstreamError                   the backend could not give a usable answer (502)
    ├── UpstreamConnectError        nothing was sent: safe to retry on another backend
    └── UpstreamTimeout             a timeout elapsed (504)
"""

from __future__ import annotations


class GatewayError(Exception):
    pass


class PolicyError(GatewayError):
    """``source`` is the file (or "<string>"); ``detail`` says where and what was expected."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


class StoreError(GatewayError):
    pass


class UpstreamError(GatewayError):
    pass


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    def __init__(self, which: str, seconds: float) -> None:
        super().__init__(f"upstream {which} timeout after {seconds:g}s")
        self.which = which
        self.seconds = seconds
