"""Header hygiene between client and backend, and what the gateway reads from the client's.

Hop-by-hop headers (RFC 9110 §7.6.1) never cross the proxy; the client's credentials never reach
the backend (it gets its own ``api_key`` instead); the client's ``Accept-Encoding`` is replaced by
``identity`` (the upstream client asks for it) so the gateway can read the ``usage`` block of
what comes back; ``Expect: 100-continue`` and ``Content-Encoding`` are dropped because the body
is read whole (and decoded) before it is forwarded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from gateway.core.types import Priority

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
        "x-request-id",  # sent as the gateway accepted or made it (``request_id``)
    )
)
# A client's request id is kept when it is short and made of characters that are safe in a log
# line and a header (what UUIDs, ULIDs and the OpenAI SDK's ids use); anything else is replaced.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
_NOT_DOWNSTREAM = HOP_BY_HOP | frozenset(("content-length", "server", "date"))


def _connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    # Headers named in Connection are hop-by-hop for this message too.
    if "Connection" not in headers:  # the common case, without building sets
        return frozenset()
    values = headers.getall("Connection")
    return frozenset(token.strip().lower() for value in values for token in value.split(",")) - {""}


def request_id(incoming: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` when it is sane, else a new one."""
    given = incoming.get("x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    # 128 random bits in hex, as a UUID's hex but without building a UUID (a third of the cost)
    return os.urandom(16).hex()


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    peer: str | None,
    scheme: str,
    backend_auth: str | None,
    request_id: str | None = None,
) -> CIMultiDict[str]:
    listed = _connection_tokens(incoming)
    dropped = _NOT_UPSTREAM | listed if listed else _NOT_UPSTREAM
    out: CIMultiDict[str] = CIMultiDict(
        [(name, value) for name, value in incoming.items() if name.lower() not in dropped]
    )
    if peer:
        prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = scheme
    if backend_auth:
        out["Authorization"] = backend_auth
    if request_id is not None:
        out["x-request-id"] = request_id
    return out


def downstream_headers(
    upstream: MultiMapping[str], own: Mapping[str, str] | None = None
) -> CIMultiDict[str]:
    """The backend's end-to-end headers for the client, then the gateway's ``own`` (named in
    lower case), which replace any of the backend's of the same name."""
    listed = _connection_tokens(upstream)
    dropped = _NOT_DOWNSTREAM | listed if listed else _NOT_DOWNSTREAM
    own = own or {}
    out = CIMultiDict(
        [
            (name, value)
            for name, value in upstream.items()
            if (lower := name.lower()) not in dropped and lower not in own
        ]
    )
    out.extend(own)  # appended: cheaper than update's search for each name
    return out


def api_key(headers: Mapping[str, str]) -> str | None:
    """The client's key: ``Authorization: Bearer``, else ``api-key`` (Azure) or ``x-api-key``
    (Anthropic); None when it sent none."""
    auth = headers.get("Authorization")
    key = None
    if auth is not None and auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
    return key or headers.get("api-key") or headers.get("x-api-key") or None


def asked_priority(headers: Mapping[str, str], band: Priority) -> Priority:
    """``x-kvgate-priority``: a request may lower its priority, or ask for one up to its
    tenant's ``band``, never above; anything else keeps the band."""
    asked = headers.get("x-kvgate-priority")
    if asked is None:
        return band
    try:
        wanted = Priority.parse(asked.strip())
    except KeyError:
        return band
    return max(wanted, band)


def asked_max_wait(headers: Mapping[str, str], max_wait_s: float) -> float:
    """The policy's queue ``max_wait``, or less when the client says so
    (``x-request-timeout``, seconds)."""
    asked = headers.get("x-request-timeout")
    if asked is None:
        return max_wait_s
    try:
        seconds = float(asked)
    except ValueError:
        return max_wait_s
    return min(max_wait_s, seconds) if seconds > 0 else max_wait_s
