"""The live state one gateway process serves with, swapped whole on a policy reload.

A request reads ``gateway.live`` once and uses that ``Live`` to the end, so a reload never
changes the policy, store or token counters under a request in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.backends.admitter import Admitter
from gateway.core.clock import Clock
from gateway.core.history import ResponseMemory
from gateway.core.tokens import TokenCounter
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.policy.compile import Policy
from gateway.store.base import LimitStore
from gateway.tracing import RequestTracer
from gateway.upstream import Upstreams

log = logging.getLogger("kvgate")


@dataclass(frozen=True, slots=True)
class Live:
    policy: Policy
    store: LimitStore
    counters: Mapping[str, TokenCounter | None]  # by model name; None: estimate from characters


@dataclass(slots=True)
class Gateway:
    live: Live
    admitter: Admitter
    metrics: Metrics
    clock: Clock
    access: AccessLog | None = None  # None: the policy turned the access log off
    upstreams: Upstreams = field(default_factory=Upstreams)  # connections to the backends
    tracer: RequestTracer | None = None  # None: traces are off (server.tracing)
    responses: ResponseMemory = field(default_factory=ResponseMemory)  # for previous_response_id
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` after the response (settlement); shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def drain(self) -> None:
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


GATEWAY = web.AppKey("gateway", Gateway)
