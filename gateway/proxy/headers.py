"""Header hygiene between client and backend.

Hop-by-hop headers (RFC 9110 §7.6.1) never cross the proxy; the client's credentials never reach
the backend (it gets its own ``api_key`` instead); the client's ``Accept-Encoding`` is replaced by
``identity`` (the upstream session's default) so the gateway can read the ``usage`` block of what
comes back; ``Expect: 100-continue`` and ``Content-Encoding`` are dropped because the body is read
whole (and decoded) before it is forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)
_NOT_UPSTREAM = HOP_BY_HOP | frozenset(
    (
        "host",
        "content-length",
        "authorization",
        "api-key",
        "x-api-key",
        "accept-encoding",
        "content-encoding",
        "expect",
        "x-kvgate-priority",
    )
)
_NOT_DOWNSTREAM = HOP_BY_HOP | frozenset(("content-length", "server", "date"))


def _connection_tokens(values: Iterable[str]) -> set[str]:
    # Headers named in Connection are hop-by-hop for this message too.
    return {token.strip().lower() for value in values for token in value.split(",")} - {""}


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    peer: str | None,
    scheme: str,
    backend_auth: str | None,
) -> CIMultiDict[str]:
    listed = _connection_tokens(incoming.getall("Connection", ()))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _NOT_UPSTREAM or lower in listed:
            continue
        out.add(name, value)
    if peer:
        prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = scheme
    if backend_auth:
        out["Authorization"] = backend_auth
    return out


def downstream_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    listed = _connection_tokens(upstream.getall("Connection", ()))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in _NOT_DOWNSTREAM and lower not in listed:
            out.add(name, value)
    return out
