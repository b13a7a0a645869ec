"""What this gateway saw of the responses it served, for requests that continue one (the
Responses API's ``previous_response_id``: the server prepends turns the body does not show).
Pure: a bounded map, no I/O. Each replica remembers what it served itself.
"""

from __future__ import annotations

from collections import OrderedDict


class ResponseMemory:
    """The settled tokens (input + output) of the last ``per_tenant`` responses each tenant got,
    by response id: a bounded LRU, so memory does not grow with traffic.

    A continued response's context is its predecessor's input and output, so the number stored
    for a new response already includes the whole chain before it.
    """

    __slots__ = ("_per_tenant", "_seen")

    def __init__(self, per_tenant: int = 1024) -> None:
        self._per_tenant = per_tenant
        self._seen: dict[str, OrderedDict[str, int]] = {}

    def remember(self, tenant: str, response_id: str, tokens: int) -> None:
        seen = self._seen.setdefault(tenant, OrderedDict())
        seen[response_id] = tokens
        seen.move_to_end(response_id)
        while len(seen) > self._per_tenant:
            seen.popitem(last=False)

    def tokens_of(self, tenant: str, response_id: str) -> int:
        """What the gateway saw of ``response_id`` for ``tenant``; 0 if it never saw it (another
        tenant's id gives nothing)."""
        seen = self._seen.get(tenant)
        if seen is None or response_id not in seen:
            return 0
        seen.move_to_end(response_id)
        return seen[response_id]
