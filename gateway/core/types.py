"""Vocabulary shared by every layer: outcomes, priorities, units.

``Outcome`` values are the single vocabulary of logs, metric labels, error bodies and load-test
reports, so a number on a dashboard maps to one place in the code.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    OK = "ok"
    SHADOW_LIMITED = "shadow_limited"  # would have been refused; shadow mode let it through
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"  # the tenant may not use this model
    REQUEST_TIMEOUT = "request_timeout"  # the body did not arrive in time: 408
    INTERNAL_ERROR = "internal_error"  # an unexpected exception: 500, counted and logged
    TOO_LARGE = "too_large"  # body over max_body, or cost over what any limit/backend can ever hold
    RATE_LIMITED = "rate_limited"  # a token bucket is empty: 429, retry later
    SHED_QUEUE_FULL = "shed_queue_full"
    SHED_DEADLINE = "shed_deadline"  # cannot be served before its deadline
    SHED_OVERLOAD = "shed_overload"  # queue delay above target (CoDel)
    SHED_LOADING = "shed_loading"  # backends are loading longer than the deadline allows
    SHED_FRAGMENTATION = "shed_fragmentation"
    STORE_ERROR = "store_error"  # limit store unreachable and policy says deny
    UPSTREAM_ERROR = "upstream_error"  # 502
    UPSTREAM_CLIENT_ERROR = "upstream_client_error"  # the backend refused it with a 4xx
    UPSTREAM_TIMEOUT = "upstream_timeout"  # 504
    CLIENT_CLOSED = "client_closed"


class Priority(enum.IntEnum):
    """Priority bands; a lower value is served first."""

    CRITICAL = 0
    STANDARD = 1
    SHEDDABLE = 2

    @classmethod
    def parse(cls, name: str) -> Priority:
        return cls[name.upper()]


class Unit(enum.StrEnum):
    """What a token bucket counts. Each unit is an amount in a request's ``Cost``."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    KV_BYTES = "kv_bytes"
    KV_GIB_SECONDS = "kv_gib_seconds"
    PRICE = "price"


class Phase(enum.StrEnum):
    """Life cycle of a backend as the gateway sees it."""

    LOADING = "loading"  # not answering health yet: no capacity
    WARMING = "warming"  # capacity ramps from a floor to full over the warm-up window
    READY = "ready"
    EJECTED = "ejected"  # failing: no traffic for a cool-down, then warming again
